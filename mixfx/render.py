"""Rich console rendering of an AnalysisReport (the CLI's human output)."""
from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mixfx.report import AnalysisReport

CLASS_STYLE = {"convolutional": "bold green", "polymorphic": "bold yellow", "fixed": "bold red"}
STATUS_STYLE = {"rigid": "bold red", "guarded": "red", "resized": "red", "global_mixing": "yellow",
                "global_context": "cyan", "head": "bold cyan",
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
    info.add_row("head", f"{report.head.module or report.head.node} ({report.head.op}"
                 f"{', top level' if not report.head.module else ''}, node {report.head.node})"
                 if report.head else ("none: the output is spatial" if report.fully_convolutional else "-"))
    info.add_row("constraints", "; ".join(_short_constraint(c) for c in report.constraints) or "none found")
    checks = []
    fails = [c for c in report.concrete_checks if not (c.ok and not c.failed_asserts)]
    for c in report.concrete_checks:
        size = "x".join(map(str, c.input_shape[2:]))
        mark = "[green]runs[/]" if c.ok and not c.failed_asserts else f"[red]fails at {c.failed_node or ', '.join(c.failed_asserts)}[/]"
        if len(fails) > 2 and c in fails:  # the size search's many failures: one line (--json has each)
            mark = "[red]fails[/]"
        checks.append(f"{size} {mark}{'' if c.agrees else ' [bold magenta](disagrees)[/]'}")
    if len(fails) > 2:
        checks = [x for x in checks if "fails" not in x][:3] + [
            f"[red]{len(fails)} other sizes fail[/] ({', '.join('x'.join(map(str, c.input_shape[2:])) for c in fails[:3])}"
            f", ...; first at {fails[0].failed_module or fails[0].failed_node})"]
    info.add_row("concrete", "; ".join(checks))
    lines.append(info)
    console.print(Panel(Group(*lines), title="mixfx analyze", expand=False))

    if report.rigid_nodes:
        console.print(Text("Where polymorphism breaks", style="bold"))
        for i, r in enumerate(report.rigid_nodes, 1):
            style = STATUS_STYLE["rigid" if r.kind == "structural" else "guarded"]
            console.print(Text.assemble(f" {i}. ", (r.module or r.node, style), f"  {r.op}, {r.kind}",
                                        (f"  (node {r.node}{', found by a concrete run' if r.source == 'concrete' else ''})", "dim")))
            console.print(f"    {r.reason}", highlight=False)
            if r.cure:
                console.print(f"    [dim]cure:[/] {r.cure}", highlight=False)
    if report.global_mixing:
        t = Table(title="Global mixing (not local, so not convolutional)", title_justify="left")
        for col in ("modules", "op", "reason"):
            t.add_column(col, overflow="fold")
        groups: dict[tuple[str, str], list[str]] = {}
        for m in report.global_mixing:
            groups.setdefault((m.op, m.reason), []).append(m.module or m.node)
        for (op, reason), mods in groups.items():
            shown = ", ".join(mods[:2]) + (f", ... ({len(mods)} nodes)" if len(mods) > 2 else "")
            t.add_row(shown, op, reason)
        console.print(t)
    if report.global_context:  # issue 13: summaries broadcast back; not mixing
        console.print(Text("Global context (not mixing: keeps it convolutional, but not tileable)", style="bold"))
        for c in report.global_context:
            console.print(f" {c.module or c.node}  {c.op}: {c.reason}", highlight=False)
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


LONG_CONSTRAINT = 160


def _short_constraint(text: str) -> str:
    """Windowed models (Swin, DaViT) give relations over nested pad/window expressions thousands of
    characters long: the table shows their start, `--json` the whole."""
    text = str(text)
    if len(text) <= LONG_CONSTRAINT:
        return text
    return f"{text[:LONG_CONSTRAINT - 40]}... ({len(text)} characters; --json has it whole)"
