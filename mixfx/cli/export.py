"""`mixfx export SPEC -o model.onnx|model.pt2`: export with the analysis's dynamic shapes, verified."""
from __future__ import annotations

import json
from typing import Any, Optional

import typer

from mixfx.cli.app import (DEBUG_HELP, INPUT_HELP, LEAF_HELP, SPEC_HELP, TRUST_HELP, MixfxCommand, app, console,
                           handle_errors, show_progress)
from mixfx.errors import UsageError

SUFFIXES = (".onnx", ".pt2")


@app.command(cls=MixfxCommand,
             help="Export to ONNX or a torch.export program with the spatial dims dynamic, spelled with the "
             "constraints the analysis found (H = 32*h, h >= 2), then load the file and check it against the eager "
             "model at the example and two other sizes. A fixed-resolution model is exported static.\n\n"
             "Exit codes: 0 written and verified, 2 usage error (bad suffix, onnx not installed), 3 model could not "
             "be loaded or exported, 4 the file did not match (nothing written), 5 the output could not be written.")
@handle_errors
def export(
    spec: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP, show_default=False),
    output: str = typer.Option(..., "--output", "-o", metavar="PATH", help="The file to write: NAME.onnx (ONNX, needs mixfx[onnx]) or NAME.pt2 (torch.export program)."),
    input: Optional[str] = typer.Option(None, "--input", "-i", metavar="SHAPE", help=INPUT_HELP),
    to: Optional[str] = typer.Option(None, "--to", metavar="TARGET", help="Rewrite first (as mixfx rewrite --to TARGET, verified): conv, linear or polymorphic."),
    entry: Optional[str] = typer.Option(None, "--entry", metavar="NAME", help="Name of the factory or instance in a .py file."),
    leaf: list[str] = typer.Option([], "--leaf", metavar="NAME", help=LEAF_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of text."),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    suffix = "." + output.rsplit(".", 1)[-1].lower() if "." in output else ""
    if suffix not in SUFFIXES:
        raise UsageError(f"cannot tell the export format from -o {output!r}: the file name must end in .onnx or .pt2.",
                         "Use -o model.onnx for ONNX or -o model.pt2 for a torch.export program.")
    from mixfx import progress
    from mixfx.export import FORMATS, ExportVerificationError, export as run_export, require_onnx
    from mixfx.loading import load_model, parse_input_shape

    if FORMATS[suffix] == "onnx":
        require_onnx()  # before loading a model for nothing
    shape = parse_input_shape(input) if input is not None else None
    try:
        with show_progress(not as_json):
            progress.stage(f"loading {spec}")
            loaded = load_model(spec, entry=entry, input_shape=shape, trust=trust)
            progress.stage(f"exporting to {output}")
            result = run_export(loaded.module, loaded.example_input, output, to=to, leaves=tuple(leaf),
                                input_path=loaded.source_path)
    except ExportVerificationError as exc:
        if exc.result is not None:
            if as_json:
                typer.echo(json.dumps({"model": loaded.name, "written": None, **exc.result.to_dict()}, indent=2))
            else:
                render_result(exc.result, loaded.name, written=False)
        raise
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "written": result.path, **result.to_dict()}, indent=2))
        return
    render_result(result, loaded.name, written=True)


def render_result(result: Any, name: str, *, written: bool) -> None:
    """The dims torch.export was given, the verification per size, and where the file went."""
    from rich.table import Table

    shapes = result.shapes
    console.print(f"[bold]mixfx export[/] {name} -> {result.format}  "
                  f"(input {'x'.join(map(str, shapes.input_shape))}, {shapes.classification})")
    if result.rewrite is not None:
        console.print(f"rewritten first: --to {result.rewrite.target}, {len(result.rewrite.changes)} changes, verified")
    table = Table(title="Dynamic shapes" + (" (static)" if shapes.static else ""))
    for col in ("dim", "exported as", "because"):
        table.add_column(col, overflow="fold")
    for d in shapes.dims:
        table.add_row(d.name, d.formula().split(" = ", 1)[1], d.why)
    console.print(table)
    if shapes.pinned_by is not None:
        console.print(f"[bold yellow]fixed:[/] pinned by {shapes.pinned_by.describe()}")
    for note in result.notes:
        if shapes.pinned_by is not None and note.startswith("fixed-resolution"):
            continue
        console.print(f"[dim]note:[/] {note}")
    table = Table(title=f"Verification ({result.format} file vs eager, random input)")
    for col in ("input", "max abs err", "max rel err", "result"):
        table.add_column(col)
    for c in result.checks:
        verdict = "[green]ok[/]" if c.passed else "[red]FAILED[/]"
        if c.error:
            verdict += f" ({c.error})"
        table.add_row("x".join(map(str, c.input_shape)), f"{c.max_abs_err:.3g}", f"{c.max_rel_err:.3g}", verdict)
    table.caption = "tolerance: max abs err <= 1e-4 * max|eager output|"
    console.print(table)
    if written:
        size_mb = result.bytes_written / 1e6
        console.print(f"wrote [bold]{result.path}[/] ({size_mb:.1f} MB), verified at {len(result.checks)} "
                      f"size{'s' if len(result.checks) != 1 else ''}")
    else:
        console.print("[red]nothing written[/]")
