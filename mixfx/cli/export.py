"""`mixfx export SPEC -o model.onnx|model.pt2`: export with the analysis's dynamic shapes, verified."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from mixfx.cli.app import app, console, handle_errors
from mixfx.errors import UsageError
from mixfx.export import FORMATS, ExportResult, ExportVerificationError, export as run_export, require_onnx
from mixfx.loading import load_model


@app.command()
@handle_errors
def export(
    spec: str = typer.Argument(..., help="The model: path/to/model.py, model.pt, package.module:attr, timm:NAME or torchvision:NAME."),
    output: str = typer.Option(..., "--output", "-o", help="The file to write: NAME.onnx (ONNX, needs mixfx[onnx]) or NAME.pt2 (torch.export program)."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Example input shape, e.g. 1x3x224x256 (overrides what the model declares)."),
    to: Optional[str] = typer.Option(None, "--to", help="Rewrite first (mixfx rewrite --to TARGET, verified): conv, linear or polymorphic."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Name of the factory or instance in a .py file."),
    leaf: list[str] = typer.Option([], "--leaf", help="Module class name or path to treat as one opaque node when tracing (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of tables."),
    trust: bool = typer.Option(False, "--trust", help="Allow loading a pickled module from a .pt file (unpickling can run arbitrary code)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-paragraph errors."),
) -> None:
    """Export to ONNX or a torch.export program with the spatial dims dynamic, spelled with the
    constraints the analysis found (H = 32*h, h >= 2), then load the file and check it against
    the eager model at the example and two other sizes. A fixed-resolution model is exported
    static. Exit codes: 0 written and verified, 2 usage error (bad suffix, onnx not installed),
    3 model could not be loaded or exported, 4 the file did not match (nothing written), 5 the
    output could not be written."""
    suffix = "." + output.rsplit(".", 1)[-1].lower() if "." in output else ""
    if suffix not in FORMATS:
        raise UsageError(f"cannot tell the export format from -o {output!r}: the file name must end in .onnx or .pt2.",
                         "Use -o model.onnx for ONNX or -o model.pt2 for a torch.export program.")
    if FORMATS[suffix] == "onnx":
        require_onnx()  # before loading a model for nothing
    loaded = load_model(spec, entry=entry, input_shape=input, trust=trust)
    try:
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


def render_result(result: ExportResult, name: str, *, written: bool) -> None:
    """The dims torch.export was given, the verification per size, and where the file went."""
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
