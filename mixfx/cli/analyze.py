"""`mixfx analyze SPEC`: the verdict, rigid nodes, head, constraints and output formula."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mixfx.cli.app import (DEBUG_HELP, INPUT_HELP, LEAF_HELP, SPEC_HELP, TRUST_HELP, MixfxCommand, app, console,
                           handle_errors, show_progress)
from mixfx.errors import EXIT_CHECK_FAILED, UsageError

CLASSES = ("convolutional", "polymorphic", "fixed", "fully-convolutional")


@app.command(cls=MixfxCommand, help="Is the model truly convolutional? Prints the verdict, where and why shape "
             "polymorphism breaks, the head, the input constraints and the output-size formula.\n\n"
             "Exit codes: 0 done, 1 --check failed, 2 usage error, 3 model could not be loaded, traced or "
             "analysed, 141 output pipe closed early.")
@handle_errors
def analyze(
    spec: str = typer.Argument(..., metavar="SPEC", help=SPEC_HELP, show_default=False),
    input: Optional[str] = typer.Option(None, "--input", "-i", metavar="SHAPE", help=INPUT_HELP),
    entry: Optional[str] = typer.Option(None, "--entry", metavar="NAME", help="Name of the factory or instance in a .py file (default: build_model, create_model, get_model or model)."),
    leaf: list[str] = typer.Option([], "--leaf", metavar="NAME", help=LEAF_HELP, show_default=False),
    nodes: bool = typer.Option(False, "--nodes", help="Also print the per-node table (op, module, symbolic shape, status)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (schema in README.md) instead of tables."),
    check: Optional[str] = typer.Option(None, "--check", metavar="CLASS", help="Exit 1 unless the verdict is CLASS: convolutional, polymorphic, fixed or fully-convolutional."),
    html: Optional[Path] = typer.Option(None, "--html", metavar="FILE", help="Also write a self-contained HTML picture of the graph to FILE."),
    meta: Optional[bool] = typer.Option(None, "--meta/--no-meta", help="Build the model on the meta device (no weight memory). Default: on for timm:/torchvision: specs."),
    trust: bool = typer.Option(False, "--trust", help=TRUST_HELP),
    budget: float = typer.Option(5.0, "--symbolic-budget", metavar="SECONDS", help="CPU seconds allowed for the symbolic run; nodes it does not reach in time are judged from concrete runs (0: no limit).", min=0),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    if check is not None and check not in CLASSES:
        raise UsageError(f"--check {check!r} is not a class.", f"Use one of: {', '.join(CLASSES)}.")
    from mixfx import progress
    from mixfx.loading import load_model, parse_input_shape
    from mixfx.render import render_report

    shape = parse_input_shape(input) if input is not None else None  # a usage error before any import of torch work
    use_meta = meta if meta is not None else spec.startswith(("timm:", "torchvision:"))
    with show_progress(not as_json):
        progress.stage(f"loading {spec}")
        loaded = load_model(spec, entry=entry, input_shape=shape, trust=trust, meta=use_meta)
        from mixfx.analysis import analyze as run_analysis

        progress.stage("analysing: symbolic run and size checks")
        report = run_analysis(loaded.module, loaded.example_input, leaves=tuple(leaf), name=loaded.name,
                              symbolic_budget_s=budget or None)
        if html is not None:
            from mixfx.html import write_html

            progress.stage(f"writing {html}")
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
