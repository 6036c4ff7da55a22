"""Rich console rendering of an AnalysisReport (the CLI's human output)."""
from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mixfx.report import AnalysisReport

CLASS_STYLE = {"convolutional": "bold green", "polymorphic": "bold yellow", "fixed": "bold red"}
STATUS_STYLE = {"rigid": "bold red", "guarded": "red", "global_mixing": "yellow", "head": "bold cyan",
                "spatial": "green", "static": "dim", "unknown": "magenta"}


def render_report(report: AnalysisReport, console: Console, *, nodes: bool = False) -> None:
    label = report.classification + (" (fully convolutional)" if report.fully_convolutional else "")
    head = Text.assemble(("verdict  ", "bold"), (label, CLASS_STYLE[report.classification]))
    lines: list = [head, Text(report.summary)]
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("model", f"{report.model}  (input {'x'.join(map(str, report.input_shape))}, traced by {report.tracer})")
    info.add_row("output", ", ".join("[" + ", ".join(o) + "]" for o in report.outputs) or "-")
    info.add_row("head", f"{report.head.module or report.head.node} ({report.head.op}, node {report.head.node})"
                 if report.head else ("none: the output is spatial" if report.fully_convolutional else "-"))
    info.add_row("constraints", "; ".join(report.constraints) or "none found")
    checks = []
    for c in report.concrete_checks:
        size = "x".join(map(str, c.input_shape[2:]))
        mark = "[green]runs[/]" if c.ok and not c.failed_asserts else f"[red]fails at {c.failed_node or ', '.join(c.failed_asserts)}[/]"
        checks.append(f"{size} {mark}{'' if c.agrees else ' [bold magenta](disagrees)[/]'}")
    info.add_row("concrete", "; ".join(checks))
    lines.append(info)
    console.print(Panel(Group(*lines), title="mixfx analyze", expand=False))

    if report.rigid_nodes:
        t = Table(title="Where polymorphism breaks", title_justify="left")
        for col in ("node", "module", "op", "kind", "reason", "cure"):
            t.add_column(col, overflow="fold")
        for r in report.rigid_nodes:
            t.add_row(r.node, r.module or "-", r.op, r.kind, r.reason, r.cure or "-")
        console.print(t)
    if report.global_mixing:
        t = Table(title="Global mixing (not local, so not convolutional)", title_justify="left")
        for col in ("node", "module", "op", "reason"):
            t.add_column(col, overflow="fold")
        for m in report.global_mixing[:8]:
            t.add_row(m.node, m.module or "-", m.op, m.reason)
        if len(report.global_mixing) > 8:
            t.add_row("...", f"{len(report.global_mixing) - 8} more", "", "")
        console.print(t)
    for d in report.disagreements:
        console.print(f"[bold magenta]disagreement:[/] {d}")
    for n in report.notes:
        console.print(f"[dim]note:[/] {n}")
    if nodes:
        render_nodes(report, console)


def render_nodes(report: AnalysisReport, console: Console) -> None:
    t = Table(title="Nodes", title_justify="left")
    for col in ("#", "node", "op", "module", "shape", "status"):
        t.add_column(col, overflow="fold")
    for i, n in enumerate(report.nodes):
        style = STATUS_STYLE.get(n.status, "")
        t.add_row(str(i), n.name, n.op, n.module or "", n.shape or "", Text(n.status, style=style))
    console.print(t)
