"""`mixfx analyze SPEC`: the verdict, rigid nodes, head, constraints and output formula."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mixfx.analysis import analyze as run_analysis
from mixfx.cli.app import app, console, handle_errors
from mixfx.errors import EXIT_CHECK_FAILED, UsageError
from mixfx.loading import load_model
from mixfx.render import render_report

CLASSES = ("convolutional", "polymorphic", "fixed", "fully-convolutional")


@app.command()
@handle_errors
def analyze(
    spec: str = typer.Argument(..., help="The model: path/to/model.py, model.pt, package.module:attr, timm:NAME or torchvision:NAME."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Example input shape, e.g. 1x3x256x320 (overrides what the model declares)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Name of the factory or instance in a .py file (default: build_model, create_model, get_model or model)."),
    leaf: list[str] = typer.Option([], "--leaf", help="Module class name or path to treat as one opaque node when tracing (repeatable)."),
    nodes: bool = typer.Option(False, "--nodes", help="Also print the per-node table (op, module, symbolic shape, status)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema in README.md) instead of tables."),
    check: Optional[str] = typer.Option(None, "--check", help="Exit 1 unless the verdict is this class: convolutional, polymorphic, fixed or fully-convolutional."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML picture of the graph to this file."),
    meta: Optional[bool] = typer.Option(None, "--meta/--no-meta", help="Build the model on the meta device (no weight memory). Default: on for timm:/torchvision: specs."),
    trust: bool = typer.Option(False, "--trust", help="Allow loading a pickled module from a .pt file (unpickling can run arbitrary code)."),
    budget: float = typer.Option(5.0, "--symbolic-budget", help="CPU seconds allowed for the symbolic run; nodes it does not reach in time are judged from concrete runs (0: no limit).", min=0),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-paragraph errors."),
) -> None:
    """Is the model truly convolutional? Prints the verdict, where and why shape polymorphism
    breaks, the head, the input constraints and the output-size formula.

    Exit codes: 0 done, 1 --check failed, 2 usage error, 3 model could not be loaded or traced."""
    if check is not None and check not in CLASSES:
        raise UsageError(f"--check {check!r} is not a class.", f"Use one of: {', '.join(CLASSES)}.")
    use_meta = meta if meta is not None else spec.startswith(("timm:", "torchvision:"))
    loaded = load_model(spec, entry=entry, input_shape=input, trust=trust, meta=use_meta)
    report = run_analysis(loaded.module, loaded.example_input, leaves=tuple(leaf), name=loaded.name,
                          symbolic_budget_s=budget or None)
    if html is not None:
        from mixfx.html import write_html  # the HTML report lands with its own issue

        write_html(report, html)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render_report(report, console, nodes=nodes)
        if html is not None:
            console.print(f"wrote {html}")
    if check is not None:
        got = "fully-convolutional" if (check == "fully-convolutional" and report.fully_convolutional) else report.classification
        if got != check:
            if not as_json:
                console.print(f"[bold red]check failed:[/] expected {check}, got {report.classification}")
            raise typer.Exit(EXIT_CHECK_FAILED)
