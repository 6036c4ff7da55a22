"""`mixfx rewrite SPEC --to TARGET`: rewrite, verify, analyse before/after, optionally save.

The targets come from `mixfx.rewrite.TARGETS`; a new target needs one line in TARGET_HELP for
its description in `--help` (a target without one is listed by name)."""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any, Optional

import typer

from mixfx.cli.app import (DEBUG_HELP, INPUT_HELP, LEAF_HELP, SPEC_HELP, TRUST_HELP, MixfxCommand, app, console,
                           handle_errors, show_progress)
from mixfx.errors import UsageError
from mixfx.names import name_patterns

TARGET_HELP = {
    "conv": "every Linear becomes a 1x1 conv, a patchify (reshape + Linear) a strided conv",
    "linear": "every 1x1 conv becomes a Linear, a strided patch conv a patchify + Linear",
    "polymorphic": "cure what fixes the input size (position tables, size checks, hard-coded views, fold sizes)",
    "fcn": "a classifier's head becomes convolutions: output [N, K, h, w], a score map on larger inputs",
}
FORMATS_HELP = ("pt: the torch.save'd GraphModule (load it with torch.load(path, weights_only=False)); "
                "folder: readable module.py + state_dict.pt, importable as a package (README, Saved outputs).")


def targets() -> tuple[str, ...]:
    from mixfx.rewrite import TARGETS  # imports torch: only when a rewrite or its --help runs

    return tuple(TARGETS)


def to_help() -> str:
    return "Rewrite target, one of: " + "; ".join(
        f"{t}: {TARGET_HELP[t]}" if t in TARGET_HELP else t for t in targets()) + "."


class RewriteCommand(MixfxCommand):
    """Fills in `--to`'s choices from mixfx.rewrite.TARGETS when the help is shown (importing
    torch then, not when `mixfx --help` runs)."""

    def format_help(self, ctx, formatter) -> None:
        for param in self.params:
            if param.name == "to":
                param.help = to_help()
        super().format_help(ctx, formatter)


@app.command(cls=RewriteCommand,
             help="Rewrite Linear <-> 1x1 conv and patchify <-> strided conv (plus layout clean-up), cure what "
             "fixes the input size (--to polymorphic) or turn a classifier's head into convolutions (--to fcn); "
             "verify the numerics against the original, and report the verdict before and after. A model with nothing to "
             "rewrite says so and writes nothing (exit 0).\n\n"
             "Exit codes: 0 done, 2 usage error, 3 model could not be loaded or traced, 4 the rewrite could not be "
             "proven equivalent (nothing written), 5 the output could not be written, 141 output pipe closed early.")
@handle_errors
def rewrite(
    spec: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP, show_default=False),
    to: str = typer.Option(..., "--to", metavar="TARGET", help="Rewrite target: conv, linear, ... (see mixfx rewrite --help)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="PATH", help="Write the rewritten GraphModule here (nothing is written without it)."),
    format: str = typer.Option("pt", "--format", metavar="FORMAT", help=FORMATS_HELP),
    only: Optional[str] = typer.Option(None, "--only", metavar="PATTERN", help="Run only the passes whose name or group matches (glob): dense, patchify, layout, linear_to_conv, ..."),
    input: Optional[str] = typer.Option(None, "--input", "-i", metavar="SHAPE", help=INPUT_HELP),
    entry: Optional[str] = typer.Option(None, "--entry", metavar="NAME", help="Name of the factory or instance in a .py file."),
    leaf: list[str] = typer.Option([], "--leaf", metavar="NAME", help=LEAF_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of text."),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    from mixfx.saving import FORMATS

    known = targets()
    if to not in known:
        raise UsageError(f"--to {to!r} is not a rewrite target.", f"Use one of: {', '.join(known)}.")
    if format not in FORMATS:
        raise UsageError(f"--format {format!r} is not an output format.", "Use --format pt or --format folder.")
    from mixfx import progress
    from mixfx.errors import VerificationError
    from mixfx.loading import load_model, parse_input_shape
    from mixfx.rewrite import rewrite as run_rewrite
    from mixfx.saving import save_module

    shape = parse_input_shape(input) if input is not None else None
    with show_progress(not as_json):
        progress.stage(f"loading {spec}")
        loaded = load_model(spec, entry=entry, input_shape=shape, trust=trust)
        try:
            result = run_rewrite(loaded.module, to, loaded.example_input, only=only, leaves=tuple(leaf))
        except VerificationError as exc:
            failed = getattr(exc, "result", None)
            if failed is not None:
                if as_json:
                    typer.echo(json.dumps({"model": loaded.name, "written": None, **failed.to_dict()}, indent=2))
                else:
                    render_result(failed, loaded.name)
            raise
        written = None
        if output is not None and result.changes:
            progress.stage(f"writing {output}")
            written = save_module(result.module, output, format, input_path=getattr(loaded, "source_path", None),
                                  example_input=loaded.example_input)
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "written": str(written) if written else None,
                               "nothing_to_rewrite": not result.changes, **result.to_dict()}, indent=2))
        return
    if not result.changes:
        console.print(f"[bold]mixfx rewrite[/] {loaded.name} --to {to}", highlight=False)
        console.print(f"[bold]nothing to rewrite:[/] --to {to}" + (f" --only {only}" if only else "")
                      + f" changes no node of {loaded.name}.", highlight=False)
        console.print("nothing written (exit 0); the reasons:" if result.skipped else "nothing written (exit 0).")
        _render_skipped(result)
        return
    render_result(result, loaded.name)
    if written is not None:
        named = Path(str(written)).suffix == f".{format}"  # `out.pt (pt)` says it twice
        console.print(f"wrote [bold]{written}[/]" + ("" if named else f" ({format})"), highlight=False)
    else:
        console.print("[dim]nothing written (use -o PATH to save the rewritten module)[/]")


# ------------------------------------------------------------------------------------- rendering
def _kind(text: str) -> str:
    """A change's before/after without its sizes, so that alike changes group:
    'Conv2d(32, 128, 1x1, bias=True) on [B,C,H,W] (input [1,32,32,32])' -> 'Conv2d 1x1 on [B,C,H,W]'."""
    text = re.sub(r"kernel_size=\((\d+), (\d+)\)", r"\1x\2", text)

    def group(m: re.Match) -> str:
        kernels = re.findall(r"\b\d+x\d+(?:x\d+)*\b", m.group(0))
        return (" " + " ".join(kernels)) if kernels else ""

    previous = None
    while previous != text:  # innermost parentheses first
        previous, text = text, re.sub(r"\s*\([^()]*\)", group, text)
    return re.sub(r"\s+", " ", text).strip()


_PERMUTES_LEFT = "layout: permutes/transposes in the graph "  # passes/layout.py's note

# a layout change that removed a permute pair around one op: `permute(0, 2, 3, 1) -> GELU -> permute(0, 3, 1, 2)`
_LAYOUT_SANDWICH = re.compile(r"^permute\([\d, ]+\) -> (\S+) -> permute\([\d, ]+\)$")


def _render_verification(v: Any) -> None:
    """One line per input size (no box: it reads the same piped), the tolerance in the title."""
    console.print(f"[bold]Verification[/] (float32, random inputs, seed {v.seed})", highlight=False)
    rows = []
    for s in v.sizes:
        shape = "x".join(map(str, s.input_shape))
        if s.max_abs_err != s.max_abs_err:  # NaN: a cured size the original does not take
            # where other sizes ran, one the cured model rejects is outside its sizes, not a failure
            verdict = ("[green]runs[/] (no reference: the original does not take this size)" if s.passed
                       else f"[yellow]not taken[/] ({s.error})" if v.passed else f"[red]FAILED[/] ({s.error})")
            rows.append((shape, None, None, None, verdict))
            continue
        verdict = "[green]ok[/]" if s.passed else "[red]FAILED[/]"
        if s.passed and s.ref_scale == 0 and s.max_abs_err == 0:
            verdict = "[yellow]all zero[/]"  # equal, but proves nothing
        if s.error:
            verdict += f" ({s.error})"
        rows.append((shape, f"{s.max_abs_err:.3g}", f"{s.max_rel_err:.3g}", f"{s.ref_scale:.3g}", verdict))
    for s in v.float64_sizes:
        rows.append(("x".join(map(str, s.input_shape)) + " (float64)", f"{s.max_abs_err:.3g}", f"{s.max_rel_err:.3g}",
                     f"{s.ref_scale:.3g}", "[green]ok[/]" if s.passed else "[red]FAILED[/]"))
    width = max((len(r[0]) for r in rows), default=0)
    for shape, abs_err, rel_err, scale, verdict in rows:
        errors = "" if abs_err is None else f"abs err {abs_err:<9} rel err {rel_err:<9} max|ref| {scale:<8} "
        console.print(f"  {shape:<{width}}  {errors}{verdict}", highlight=False, soft_wrap=True)
    tolerance = f"tolerance: abs err <= {v.tolerance['atol']:g} + {v.tolerance['rtol']:g} * max|ref|"
    if v.float64_sizes:
        tolerance += "; float32 missed it, float64 rows: rel err <= 1e-9"
    if v.randomised:
        tolerance += f"; on copies with {len(v.randomised)} all-zero parameter(s) drawn at random"
    for line in textwrap.wrap(tolerance, _width(), initial_indent="  ", subsequent_indent="  ",
                              break_long_words=False, break_on_hyphens=False):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if v.unproven:
        for line in textwrap.wrap(f"not proven: {v.unproven}", _width(), subsequent_indent="  ",
                                  break_long_words=False, break_on_hyphens=False):
            console.print(line, style="red", highlight=False, markup=False, soft_wrap=True)


def _width() -> int:
    return max(40, console.width)


def print_group(count: int, text: str, names: list[str]) -> None:
    """One line `  COUNT  TEXT  NAMES` when it fits the console, else the names on an indented
    line under it; wrapped lines keep their indent and never split a word or a module path."""
    width = _width()
    head = f"{count:>4}  {text}"
    shown = ", ".join(name_patterns([n for n in names if n]))
    if shown and len(head) + 2 + len(shown) <= width:
        console.print(f"{head}  {shown}", highlight=False, markup=False, soft_wrap=True)
        return
    for line in textwrap.wrap(head, width, subsequent_indent=" " * 6, break_long_words=False, break_on_hyphens=False):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if shown:
        print_group_names(shown)


def print_group_names(text: str) -> None:
    """A continuation line under a group, indented like its names."""
    for line in textwrap.wrap(text, _width(), initial_indent=" " * 6, subsequent_indent=" " * 6,
                              break_long_words=False, break_on_hyphens=False):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _render_skipped(result: Any) -> None:
    if result.skipped:
        console.print(f"[bold]Skipped ({len(result.skipped)})[/]")
        skips: dict[tuple[str, str], list[str]] = {}
        for s in result.skipped:
            skips.setdefault((s.pass_name, s.reason), []).append(s.module or s.node)
        for (pass_name, reason), names in skips.items():
            print_group(len(names), f"{pass_name}: {reason}", names)


def render_result(result: Any, name: str) -> None:
    """The rewrite as lines that read at 80 columns and through pipes: alike changes and alike
    skips grouped one line each (`--json` has every one, and the passes that ran), the
    verification one line per size, the verdicts."""
    console.print(f"[bold]mixfx rewrite[/] {name} --to {result.target}", highlight=False)
    console.print(f"[bold]Changes ({len(result.changes)})[/]")
    groups: dict[tuple[str, str], list[str]] = {}
    cancelled: dict[str, int] = {}  # layout: permute pairs cancelled around an op -> how many
    renamed: dict[str, str] = {}  # ... and the ops that now work on the other layout
    for c in result.changes:
        around = _LAYOUT_SANDWICH.match(c.before) if c.pass_name == "layout" else None
        if around:
            op = around.group(1)
            cancelled[op] = cancelled.get(op, 0) + 1
            if c.after != op:
                renamed[op] = c.after
            continue
        if c.pass_name == "layout":  # another layout pattern: the exact pattern and what it became
            key = (c.pass_name, f"{c.before}  =>  {c.after}")
        else:
            key = (c.pass_name, f"{_kind(c.before)} -> {_kind(c.after)}")
        groups.setdefault(key, []).append(c.module or c.node)
    if not groups and not cancelled:
        console.print("     none")
    for (pass_name, text), names in groups.items():
        print_group(len(names), f"{pass_name}  {text}", names if pass_name != "layout" else [])
    notes = list(result.notes)
    if cancelled:
        # the pass's count of permutes left reads as part of this line, not as a note of its own
        left = next((n for n in notes if n.startswith(_PERMUTES_LEFT)), None)
        if left is not None:
            notes.remove(left)
        print_group(sum(cancelled.values()), "layout  permute pairs cancelled"
                    + (f"; permutes in the graph {left[len(_PERMUTES_LEFT):]}" if left else ""), [])
        print_group_names("around " + ", ".join(f"{op} x{n}" for op, n in cancelled.items()))
        if renamed:
            print_group_names("now " + ", ".join(f"{op} -> {new}" for op, new in renamed.items()))
    _render_skipped(result)
    score_map = result.score_map.describe() if result.score_map is not None else None  # --to fcn
    if score_map:
        for line in textwrap.wrap(score_map, _width(), subsequent_indent="  ", break_long_words=False,
                                  break_on_hyphens=False):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    for note in notes:
        if note == score_map:
            continue
        for i, line in enumerate(textwrap.wrap(f"note: {note}", _width(), subsequent_indent="      ",
                                               break_long_words=False, break_on_hyphens=False)):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    v = result.verification
    if v is not None:
        _render_verification(v)
    if result.classification_before is not None:
        before, after = result.classification_before, result.classification_after or "-"
        if before == after and not result.rigid_before and not result.rigid_after:
            console.print(f"[bold]Analysis verdict[/]  {before}, before and after", highlight=False)
        else:
            console.print("[bold]Analysis verdict[/]")
            for label, cls, rigid in (("before", before, result.rigid_before), ("after", after, result.rigid_after)):
                line = f"  {label:<7}{cls}" + (f"  rigid: {', '.join(name_patterns(rigid))}" if rigid else "")
                for part in textwrap.wrap(line, _width(), subsequent_indent=" " * 9, break_long_words=False,
                                          break_on_hyphens=False):
                    console.print(part, highlight=False, markup=False, soft_wrap=True)
        changed = result.classification_after and result.classification_after != result.classification_before
        if result.target == "polymorphic":
            if changed:
                console.print(f"cured: {result.classification_before} -> {result.classification_after}")
        elif changed and result.target != "fcn":  # fcn: a flatten + Linear head made fixed, converted it is not
            console.print("[bold yellow]warning:[/] the classification changed under the rewrite")
