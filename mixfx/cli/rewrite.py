"""`mixfx rewrite SPEC --to conv|linear`: rewrite, verify, analyse before/after, optionally save."""
from __future__ import annotations

import inspect
import json
from typing import Optional

import typer
from rich.table import Table

from mixfx.cli.app import app, console, handle_errors
from mixfx.errors import UsageError, VerificationError
from mixfx.loading import load_model
from mixfx.rewrite import TARGETS, RewriteResult, rewrite as run_rewrite
from mixfx.saving import FORMATS, save_module

MAX_ROWS = 40  # longer change lists are summarised (the JSON output has them all)


@app.command()
@handle_errors
def rewrite(
    spec: str = typer.Argument(..., help="The model: path/to/model.py, model.pt, package.module:attr, timm:NAME or torchvision:NAME."),
    to: str = typer.Option(..., "--to", help="conv: every Linear becomes a 1x1 conv; linear: every 1x1 conv becomes a Linear; polymorphic: cure what fixes the input size (position tables, size checks, hard-coded views, fold sizes)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the rewritten GraphModule here (nothing is written without it)."),
    format: str = typer.Option("pt", "--format", help="pt: torch.save'd GraphModule; folder: readable source + weights (GraphModule.to_folder)."),
    only: Optional[str] = typer.Option(None, "--only", help="Run only the passes whose name or group matches (glob): dense, patchify, layout, linear_to_conv, ..."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Example input shape, e.g. 1x3x224x224 (overrides what the model declares)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Name of the factory or instance in a .py file."),
    leaf: list[str] = typer.Option([], "--leaf", help="Module class name or path to treat as one opaque node when tracing (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    trust: bool = typer.Option(False, "--trust", help="Allow loading a pickled module from a .pt file (unpickling can run arbitrary code)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-paragraph errors."),
) -> None:
    """Rewrite Linear <-> 1x1 conv (plus layout clean-up), verify the numerics, and report the
    verdict before and after. Exit codes: 0 done, 2 usage error, 3 model could not be loaded or
    traced, 4 the rewrite could not be verified (nothing written), 5 the output could not be written."""
    if to not in TARGETS:
        raise UsageError(f"--to {to!r} is not a rewrite target.", "Use --to conv, --to linear or --to polymorphic.")
    if format not in FORMATS:
        raise UsageError(f"--format {format!r} is not an output format.", "Use --format pt or --format folder.")
    kwargs = {"entry": entry, "input_shape": input, "trust": trust}
    if "leaves" in inspect.signature(load_model).parameters:
        kwargs["leaves"] = tuple(leaf)
    loaded = load_model(spec, **kwargs)
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
    if output is not None:
        written = save_module(result.module, output, format, input_path=getattr(loaded, "source_path", None),
                              example_input=loaded.example_input)
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "written": str(written) if written else None, **result.to_dict()},
                              indent=2))
        return
    render_result(result, loaded.name)
    if written is not None:
        console.print(f"wrote [bold]{written}[/] ({format})")
    else:
        console.print("[dim]nothing written (use -o PATH to save the rewritten module)[/]")


def render_result(result: RewriteResult, name: str) -> None:
    """Tables: changes, skipped, verification, verdict before/after."""
    console.print(f"[bold]mixfx rewrite[/] {name} --to {result.target}  (passes: {', '.join(result.passes)})")
    table = Table(title=f"Changes ({len(result.changes)})", show_lines=False)
    for col in ("pass", "node", "module", "before", "after"):
        table.add_column(col, overflow="fold")
    dense = [c for c in result.changes if c.pass_name != "layout"]
    for c in dense[:MAX_ROWS]:
        table.add_row(c.pass_name, c.node, c.module or "", c.before, c.after)
    if len(dense) > MAX_ROWS:
        table.add_row("...", f"{len(dense) - MAX_ROWS} more", "", "", "(see --json)")
    # layout changes are many and alike: one row per kind, with how often it happened
    kinds: dict[tuple[str, str], int] = {}
    for c in result.changes:
        if c.pass_name == "layout":
            kinds[(c.before, c.after)] = kinds.get((c.before, c.after), 0) + 1
    for (before, after), n in kinds.items():
        table.add_row("layout", f"x{n}", "", before, after)
    console.print(table)
    if result.skipped:
        table = Table(title=f"Skipped ({len(result.skipped)})")
        for col in ("pass", "node", "module", "reason"):
            table.add_column(col, overflow="fold")
        for s in result.skipped[:MAX_ROWS]:
            table.add_row(s.pass_name, s.node, s.module or "", s.reason)
        if len(result.skipped) > MAX_ROWS:
            table.add_row("...", f"{len(result.skipped) - MAX_ROWS} more", "", "(see --json)")
        console.print(table)
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")
    v = result.verification
    if v is not None:
        table = Table(title="Verification (float32, random inputs, seed %d)" % v.seed)
        for col in ("input", "max abs err", "max rel err", "max |ref|", "result"):
            table.add_column(col)
        for s in v.sizes:
            verdict = "[green]ok[/]" if s.passed else "[red]FAILED[/]"
            if s.error:
                verdict += f" ({s.error})"
            if s.max_abs_err != s.max_abs_err:  # NaN: a cured size the original does not take
                verdict = ("[green]runs[/]" if s.passed else "[red]FAILED[/]") + (
                    " (no reference: the original does not take this size)" if s.passed else f" ({s.error})")
                table.add_row("x".join(map(str, s.input_shape)), "-", "-", "-", verdict)
                continue
            table.add_row("x".join(map(str, s.input_shape)), f"{s.max_abs_err:.3g}", f"{s.max_rel_err:.3g}",
                          f"{s.ref_scale:.3g}", verdict)
        for s in v.float64_sizes:
            verdict = "[green]ok[/]" if s.passed else "[red]FAILED[/]"
            table.add_row("x".join(map(str, s.input_shape)) + " (float64)", f"{s.max_abs_err:.3g}",
                          f"{s.max_rel_err:.3g}", f"{s.ref_scale:.3g}", verdict)
        table.caption = f"tolerance: max abs err <= {v.tolerance['atol']:g} + {v.tolerance['rtol']:g} * max|ref|"
        if v.float64_sizes:
            table.caption += "; float32 missed it, float64 rows: rel err <= 1e-9"
        if v.degenerate:
            table.caption += " (all outputs are zero: this comparison cannot detect a wrong rewrite)"
        console.print(table)
    if result.classification_before is not None:
        table = Table(title="Analysis verdict")
        table.add_column("")
        table.add_column("classification")
        table.add_column("rigid nodes", overflow="fold")
        table.add_row("before", result.classification_before, ", ".join(result.rigid_before) or "-")
        table.add_row("after", result.classification_after or "-", ", ".join(result.rigid_after) or "-")
        console.print(table)
        if result.target == "polymorphic":
            if result.classification_after and result.classification_after != result.classification_before:
                console.print(f"cured: {result.classification_before} -> {result.classification_after}")
        elif result.classification_after and result.classification_after != result.classification_before:
            console.print("[bold yellow]warning:[/] the classification changed under the rewrite")
