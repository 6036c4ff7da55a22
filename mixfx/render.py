"""Rich console rendering of an AnalysisReport (the CLI's human output)."""
from __future__ import annotations

from rich.console import Console, Group
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mixfx.names import name_patterns
from mixfx.receptive_field import short_text, summary_line
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
    rf_line = summary_line(report.receptive_field, report.tileable)  # issue 14
    if rf_line:
        info.add_row("field", rf_line.removeprefix("receptive field "))
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
        where = fails[0].failed_module or fails[0].failed_node
        checks = [x for x in checks if "fails" not in x][:3] + [
            f"[red]{len(fails)} other sizes fail[/] ({', '.join('x'.join(map(str, c.input_shape[2:])) for c in fails[:3])}"
            f", ...{f'; first at {where}' if where else ''})"]
    info.add_row("concrete", "; ".join(checks))
    lines.append(info)
    console.print(Panel(Group(*lines), title="mixfx analyze", expand=False))

    if report.rigid_nodes:
        console.print(Text("Where polymorphism breaks", style="bold"))
        for i, r in enumerate(report.rigid_nodes, 1):
            style = STATUS_STYLE["rigid" if r.kind == "structural" else "guarded"]
            console.print(Text.assemble(f" {i}. ", (r.module or r.node, style), f"  {r.op}, {r.kind}",
                                        (f"  (node {r.node}{', found by a concrete run' if r.source == 'concrete' else ''})", "dim")))
            # wrapped lines keep the indent (a plain string would wrap to column 0)
            console.print(Padding(Text(r.reason), (0, 0, 0, 4), expand=False), highlight=False)
            if r.cure:
                console.print(Padding(Text.assemble(("cure: ", "dim"), r.cure), (0, 0, 0, 4), expand=False), highlight=False)
    if report.global_mixing:
        console.print(Text("Global mixing (not local, so not convolutional)", style="bold"))
        groups: dict[tuple[str, str], list[str]] = {}
        for m in report.global_mixing:
            groups.setdefault((m.op, m.reason), []).append(m.module or m.node)
        for (op, reason), mods in groups.items():
            shown = ", ".join(name_patterns(mods)) + (f" ({len(mods)} nodes)" if len(mods) > 1 else "")
            console.print(Padding(Text.assemble((shown, STATUS_STYLE["global_mixing"]), f"  {op}"), (0, 0, 0, 1),
                                  expand=False), highlight=False)
            console.print(Padding(Text(reason), (0, 0, 0, 4), expand=False), highlight=False)
    if report.global_context:  # summaries broadcast back: not mixing, but not tileable
        console.print(Text("Global context (not mixing: keeps it convolutional, but not tileable)", style="bold"))
        groups = {}
        for c in report.global_context:
            groups.setdefault((c.op, c.reason), []).append(c.module or c.node)
        for (op, reason), mods in groups.items():
            shown = ", ".join(name_patterns(mods)) + (f" ({len(mods)} nodes)" if len(mods) > 1 else "")
            console.print(Padding(Text.assemble((shown, "bold"), f"  {op}"), (0, 0, 0, 1), expand=False),
                          highlight=False)
            console.print(Padding(Text(reason), (0, 0, 0, 4), expand=False), highlight=False)
    for d in report.disagreements:
        console.print(f"[bold magenta]disagreement:[/] {d}")
    for n in report.notes:
        console.print(f"[dim]note:[/] {n}")
    if nodes:
        render_nodes(report, console)


def render_nodes(report: AnalysisReport, console: Console) -> None:
    """One row per node, borderless so that the shape formulas get the width: the module path
    (the node's name after it when the two differ, e.g. `fc1 (node fc1_1)`), op, status, shape."""
    from rich import box

    rows = []
    for i, n in enumerate(report.nodes):
        if not n.module:
            name = n.name
        elif n.module.replace(".", "_") == n.name:
            name = n.module
        else:
            name = f"{n.module} (node {n.name})"
        rows.append((str(i), name, n.op, n.status, n.shape or "", short_text(n.receptive_field)))
    # fixed widths: the shape formula gets what the other columns leave (rich would shrink it most)
    width = max(60, console.width)
    idx_w = max((len(r[0]) for r in rows), default=1)
    name_w = min(max((len(r[1]) for r in rows), default=4), width // 4)
    op_w = min(max((len(r[2]) for r in rows), default=2), 12)
    status_w = max([len("status")] + [len(r[3]) for r in rows])
    field_w = max([len("field")] + [len(r[5]) for r in rows])
    # each of the 5 joins between the 6 columns takes 3 characters (padding, rule, padding)
    shape_w = max(16, width - idx_w - name_w - op_w - status_w - field_w - 3 * 5)
    t = Table(title="Nodes", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    t.add_column("#", justify="right", width=idx_w)
    t.add_column("module / node", overflow="fold", width=name_w)
    t.add_column("op", overflow="fold", width=op_w)
    t.add_column("status", no_wrap=True, width=status_w)
    t.add_column("shape", overflow="fold", width=shape_w)
    t.add_column("field", no_wrap=True, width=field_w)  # receptive field size/stride, ∞ when unbounded
    for i, name, op, status, shape, field in rows:
        t.add_row(i, name, op, Text(status, style=STATUS_STYLE.get(status, "")), shape, field)
    console.print(t)


LONG_CONSTRAINT = 160


def _short_constraint(text: str) -> str:
    """Windowed models (Swin, DaViT) give relations over nested pad/window expressions thousands of
    characters long: the table shows their start, `--json` the whole."""
    text = str(text)
    if len(text) <= LONG_CONSTRAINT:
        return text
    return f"{text[:LONG_CONSTRAINT - 40]}... ({len(text)} characters; --json has it whole)"
