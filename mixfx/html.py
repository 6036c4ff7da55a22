"""`mixfx analyze --html`: one self-contained HTML page showing the traced graph by status.

Why a page and not a picture: a ResNet-50 has ~200 nodes and a ViT-B ~500, so the graph is folded
into one collapsible row per repeated block (`layer2.1`, `blocks.3`), and the details of a node
(module path, op, symbolic shape, reason) live in a panel filled on click, not on the drawing.

Python decides the structure: which nodes fold into which block, the layer (row) of every item
(longest-path layering via networkx) and the order inside a row (one barycenter sweep). A small
inline script turns that into coordinates, so expanding a block just re-runs the layout. No
network access is needed to open the page: no CDN, no external fonts, no libraries.
"""
from __future__ import annotations

import html
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import networkx as nx

from mixfx.receptive_field import short_text, summary_line
from mixfx.report import AnalysisReport, NodeInfo

# Worst first: a folded block takes the worst status of the nodes inside it.
STATUS_ORDER = ("rigid", "guarded", "resized", "global_mixing", "global_context", "head", "unknown", "spatial",
                "static")
STATUS_LABEL = {
    "spatial": "spatially polymorphic",
    "static": "static (no spatial dim)",
    "rigid": "rigid (pins the input size)",
    "guarded": "guarded (explicit size check)",
    "global_mixing": "global mixing",
    "global_context": "global context (summary broadcast back)",
    "resized": "resized to a constant size",
    "head": "head",
    "unknown": "unknown",
}
# Fill colours; rigid is a saturated red that nothing else uses (tests compare against it).
STATUS_FILL = {
    "spatial": "#cfe9c6",
    "static": "#e4e4e4",
    "rigid": "#d62728",
    "guarded": "#ff9f1c",
    "global_mixing": "#d4c4ea",
    "global_context": "#c6e2e9",
    "resized": "#f4a582",
    "head": "#9ecae1",
    "unknown": "#fff3b0",
}
RIGID_COLOUR = STATUS_FILL["rigid"]
MIN_FOLD = 3  # fewer nodes than this stay unfolded: folding two nodes hides more than it saves


# ----------------------------------------------------------------------------- folding
def worst_status(statuses: Iterable[str]) -> str:
    """The status a folded block shows: the first of STATUS_ORDER present inside it."""
    present = set(statuses)
    for s in STATUS_ORDER:
        if s in present:
            return s
    return "unknown"


def _numeric_prefixes(module: str) -> list[str]:
    """`stages.1.blocks.0.conv_dw` -> [`stages.1.blocks.0`, `stages.1`] (deepest first)."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()]


def group_keys(nodes: Sequence[NodeInfo]) -> list[str | None]:
    """The block each node folds into, or None.

    The deepest `...N` prefix of its module path that holds at least MIN_FOLD nodes (so
    `layer1.0.downsample.0`, a single conv inside a Sequential, folds into `layer1.0`), else its
    top-level module (`patch_embed`, `stem`)."""
    counts: dict[str, int] = {}
    for n in nodes:
        for p in _numeric_prefixes(n.module or ""):
            counts[p] = counts.get(p, 0) + 1
    keys: list[str | None] = []
    for n in nodes:
        if not n.module or n.op == "placeholder":
            keys.append(None)
            continue
        prefix = next((p for p in _numeric_prefixes(n.module) if counts[p] >= MIN_FOLD), None)
        keys.append(prefix or n.module.split(".")[0])
    return keys


@dataclass
class Item:
    """One row entry of the folded graph: a single node, or a block of consecutive nodes."""

    key: str  # node name, or block module prefix
    nodes: list[NodeInfo]
    is_block: bool
    layer: int = 0
    classes: set[str] = field(default_factory=set)

    @property
    def status(self) -> str:
        return worst_status(n.status for n in self.nodes)


def fold(nodes: Sequence[NodeInfo], fold_blocks: bool = True) -> list[Item]:
    """Runs of consecutive nodes with the same group key become one block (>= MIN_FOLD nodes)."""
    items: list[Item] = []
    run: list[NodeInfo] = []
    run_key: str | None = None

    def flush() -> None:
        if run_key is not None and len(run) >= MIN_FOLD and fold_blocks:
            items.append(Item(run_key, list(run), True))
        else:
            items.extend(Item(n.name, [n], False) for n in run)

    for node, key in zip(nodes, group_keys(nodes)):
        if key is None or key != run_key:
            flush()
            run, run_key = [], key
        run.append(node)
    flush()
    seen: dict[str, int] = {}
    for it in items:  # a block prefix that reappears later gets its own id
        if it.is_block:
            seen[it.key] = seen.get(it.key, 0) + 1
            if seen[it.key] > 1:
                it.key = f"{it.key} ({seen[it.key]})"
    return items


# ----------------------------------------------------------------------------- layering
def layer_items(n_items: int, edges: set[tuple[int, int]]) -> list[list[int]]:
    """Rows of item indices, top to bottom.

    Longest-path layering (networkx topological generations of the DAG would stack every source on
    row 0; here a source other than the first item, e.g. a weight read by `get_attr`, sits right
    above its first consumer). Inside a row, items are ordered by the mean position of their
    predecessors, which keeps a residual branch beside the main chain instead of crossing it."""
    g = nx.DiGraph()
    g.add_nodes_from(range(n_items))
    g.add_edges_from(edges)
    layer: dict[int, int] = {}
    for v in nx.topological_sort(g):
        preds = list(g.predecessors(v))
        layer[v] = max((layer[u] + 1 for u in preds), default=0)
    for v in sorted(g.nodes, reverse=True):  # sources hang just above their first consumer
        if v != 0 and g.in_degree(v) == 0 and g.out_degree(v) > 0:
            layer[v] = max(0, min(layer[w] for w in g.successors(v)) - 1)
    rows: list[list[int]] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for v in range(n_items):
        rows[layer[v]].append(v)
    pos: dict[int, float] = {}
    for row in rows:
        def bary(v: int) -> tuple[float, int]:
            ps = [pos[u] for u in g.predecessors(v) if u in pos]
            return (sum(ps) / len(ps) if ps else 0.0, v)

        row.sort(key=bary)
        for i, v in enumerate(row):
            pos[v] = i - (len(row) - 1) / 2
    return [r for r in rows if r]


# ----------------------------------------------------------------------------- page data
def _first_rigid(report: AnalysisReport) -> str | None:
    """The earliest (in graph order) rigid or guarded node: where polymorphism first breaks."""
    rigid = {r.node for r in report.rigid_nodes} or {n.name for n in report.nodes if n.status == "rigid"}
    return next((n.name for n in report.nodes if n.name in rigid), None)


def rigid_path(report: AnalysisReport) -> set[str]:
    """Nodes on some path from an input to the first rigid node (that node included)."""
    target = _first_rigid(report)
    if target is None:
        return set()
    g = nx.DiGraph()
    for n in report.nodes:
        g.add_node(n.name)
        g.add_edges_from((i, n.name) for i in n.inputs)
    sources = {n.name for n in report.nodes if n.op == "placeholder"}
    up = nx.ancestors(g, target) | {target}
    down: set[str] = set()
    for s in sources & up:
        down |= nx.descendants(g, s) | {s}
    return up & down if down else {target}


def _constant_fan_out(nodes: Sequence[NodeInfo]) -> set[str]:
    """Non-spatial inputs and constants read by more than two nodes (timm's `attn_mask` feeds every
    block): their edges are left out of the drawing, which would otherwise be all fan-out lines."""
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    return {n.name for n in nodes
            if n.op in ("placeholder", "get_attr") and n.status != "spatial" and readers.get(n.name, 0) > 2}


def _node_data(n: NodeInfo, report: AnalysisReport, block: str | None, change: str | None) -> dict:
    d: dict[str, Any] = {"name": n.name, "module": n.module, "op": n.op, "shape": n.shape,
                         "status": n.status, "depends_on": n.depends_on, "inputs": n.inputs,
                         "block": block, "detail": n.detail,
                         "receptive_field": short_text(n.receptive_field) or None}  # issue 14
    for r in report.rigid_nodes:
        if r.node == n.name:
            d.update(reason=r.reason, condition=r.condition, cure=r.cure, kind=r.kind)
    for gm in [*report.global_mixing, *report.global_context]:
        if gm.node == n.name and not d.get("reason"):
            d["reason"] = gm.reason
    if change:
        d["change"] = change
    return d


def _short(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _inner_label(n: NodeInfo, prefix: str) -> str:
    """Inside block `blocks.0`, `blocks.0.attn.qkv` reads `attn.qkv`; a block-level op its node name."""
    module = n.module or ""
    return module[len(prefix):] if module.startswith(prefix) else n.name


NODE_W, BLOCK_W, ROW_H = 230, 250, 42  # must match the script's constants
_CHARS = 33  # about what fits in a node box at 11px monospace


class _GraphWriter:
    """Turns one report into an <svg> and the JSON its script lays out."""

    def __init__(self, report: AnalysisReport, gid: str, changed: dict[str, str] | None = None):
        self.report = report
        self.gid = gid
        self.changed = changed or {}
        self.path = rigid_path(report)
        self.items = fold(report.nodes)
        self.item_of = {n.name: i for i, it in enumerate(self.items) for n in it.nodes}
        self.fan_out = _constant_fan_out(report.nodes)

    def _node_classes(self, n: NodeInfo) -> str:
        cls = ["node", f"status-{n.status}"]
        if n.name in self.path:
            cls.append("on-rigid-path")
        if n.name in self.changed:
            cls.append("changed")
        return " ".join(cls)

    def _edges(self, names: set[str] | None) -> list[tuple[int, int, bool]]:
        """Edges between items (names=None) or between the nodes of one block."""
        out: dict[tuple[int, int], bool] = {}
        for n in self.report.nodes:
            for src in n.inputs:
                if src not in self.item_of or src in self.fan_out:
                    continue
                on = src in self.path and n.name in self.path
                if names is None:
                    u, v = self.item_of[src], self.item_of[n.name]
                elif src in names and n.name in names:
                    u, v = src, n.name  # type: ignore[assignment]
                else:
                    continue
                if u != v:
                    out[(u, v)] = out.get((u, v), False) or on
        return [(u, v, on) for (u, v), on in out.items()]

    def _node_svg(self, n: NodeInfo, label: str, idx: int) -> str:
        line1 = _short(f"{label} \u00b7 {n.op}", _CHARS)
        title = f"{n.module or n.name} \u00b7 {n.op}\n{n.shape or ''}\nstatus: {n.status}"
        reason = n.detail
        if reason:
            title += f"\n{reason}"
        return (f'<g class="{self._node_classes(n)}" data-node="{html.escape(n.name)}" data-i="{idx}">'
                f"<title>{html.escape(title)}</title>"
                f'<rect class="box" width="{NODE_W}" height="{ROW_H}" rx="6"/>'
                f'<text x="8" y="16" class="l1">{html.escape(line1)}</text>'
                f'<text x="8" y="33" class="l2">{html.escape(_short(n.shape, _CHARS + 3))}</text></g>')

    def render(self) -> tuple[str, dict]:
        item_edges = self._edges(None)
        rows = layer_items(len(self.items), {(u, v) for u, v, _ in item_edges})
        parts: list[str] = []
        blocks: dict[str, Any] = {}
        nodes: dict[str, Any] = {}
        for i, it in enumerate(self.items):
            block_key = it.key if it.is_block else None
            for n in it.nodes:
                nodes[n.name] = _node_data(n, self.report, block_key, self.changed.get(n.name))
            if not it.is_block:
                n = it.nodes[0]
                parts.append(self._node_svg(n, n.module or n.name, i).replace('class="node', 'class="item node', 1))
                continue
            names = [n.name for n in it.nodes]
            local = {name: k for k, name in enumerate(names)}
            inner = [(local[u], local[v], on) for u, v, on in self._edges(set(names))]
            inner_rows = layer_items(len(names), {(u, v) for u, v, _ in inner})
            expand = any(n.status in ("rigid", "guarded") for n in it.nodes)
            cls = ["item", "block", f"status-{it.status}"]
            if any(n.name in self.path for n in it.nodes):
                cls.append("on-rigid-path")
            if any(n.name in self.changed for n in it.nodes):
                cls.append("changed")
            if expand:
                cls.append("expanded")
            counts = {}
            for n in it.nodes:
                counts[n.status] = counts.get(n.status, 0) + 1
            tally = ", ".join(f"{c} {s}" for s, c in sorted(counts.items(), key=lambda kv: STATUS_ORDER.index(kv[0])
                                                               if kv[0] in STATUS_ORDER else 99))
            title = f"{it.key}: {len(names)} nodes ({tally})\nout: {it.nodes[-1].shape or ''}\nclick to expand"
            prefix = it.key.split(" ")[0] + "."
            inner_svg = "".join(self._node_svg(n, _inner_label(n, prefix), k) for k, n in enumerate(it.nodes))
            inner_paths = "".join(
                f'<path class="edge{" on-rigid-path" if on else ""}" data-u="{u}" data-v="{v}"/>' for u, v, on in inner)
            parts.append(
                f'<g class="{" ".join(cls)}" data-block="{html.escape(it.key)}" data-i="{i}">'
                f'<g class="collapsed-view"><title>{html.escape(title)}</title>'
                f'<rect class="box" width="{BLOCK_W}" height="{ROW_H}" rx="6"/>'
                f'<text x="8" y="16" class="l1">\u25b8 {html.escape(_short(it.key, 22))} \u00b7 {len(names)} nodes</text>'
                f'<text x="8" y="33" class="l2">{html.escape(_short(it.nodes[-1].shape, _CHARS + 3))}</text></g>'
                f'<g class="expanded-view"><rect class="frame" rx="8"/>'
                f'<text x="8" y="16" class="frame-title">\u25be {html.escape(it.key)} \u00b7 {len(names)} nodes</text>'
                f'<g class="edges">{inner_paths}</g>{inner_svg}</g></g>')
            blocks[str(i)] = {"rows": inner_rows, "n": len(names)}
        edge_svg = "".join(
            f'<path class="edge{" on-rigid-path" if on else ""}" data-u="{u}" data-v="{v}"/>' for u, v, on in item_edges)
        svg = (f'<svg class="graph" id="{self.gid}" data-graph="{self.gid}" role="img">'
               f'<g class="edges">{edge_svg}</g>{"".join(parts)}</svg>')
        return svg, {"rows": rows, "blocks": blocks, "nodes": nodes}


# ----------------------------------------------------------------------------- the page
def _header(report: AnalysisReport, title: str | None = None) -> str:
    e = html.escape
    rows = [
        ("model", f"{report.model} (input {'x'.join(map(str, report.input_shape))}, traced by {report.tracer})"),
        ("output", "[" + ", ".join(report.output_shape) + "]" if report.output_shape else "?"),
        ("head", f"{report.head.module or report.head.node} ({report.head.op})" if report.head else "none found"),
        ("field", summary_line(report.receptive_field, report.tileable) or "not computed"),
    ]
    cons = "".join(f"<li><code>{e(c)}</code></li>" for c in report.constraints) or "<li>none found</li>"
    rigid = "".join(
        f'<li><a href="#" class="goto" data-target="{e(r.node)}">{e(r.module or r.node)}</a> '
        f"<span class=\"pill status-{'guarded' if r.kind == 'guarded' else 'rigid'}\">{e(r.kind)}</span> {e(r.reason)}</li>"
        for r in report.rigid_nodes)
    context = "".join(  # summaries broadcast back onto the map: not mixing, but not tileable
        f'<li><a href="#" class="goto" data-target="{e(c.node)}">{e(c.module or c.node)}</a> {e(c.op)}: {e(c.reason)}</li>'
        for c in report.global_context)
    return (f'<section class="summary"><h2>{e(title or report.model)} '
            f'<span class="verdict v-{e(report.classification)}">{e(report.classification)}</span></h2>'
            f'<p class="sentence">{e(report.summary)}</p>'
            f'<div class="constraints"><b>input constraints</b><ul>{cons}</ul></div>'
            f'<table class="facts">{"".join(f"<tr><th>{k}</th><td>{e(v)}</td></tr>" for k, v in rows)}</table>'
            + (f'<div class="rigid-list"><b>where polymorphism breaks</b><ol>{rigid}</ol></div>' if rigid else "")
            + (f'<div class="rigid-list"><b>global context (not mixing)</b><ul>{context}</ul></div>' if context else "")
            + "</section>")


def _legend() -> str:
    sw = "".join(f'<span class="sw status-{s}"><i></i>{html.escape(STATUS_LABEL[s])}</span>' for s in STATUS_ORDER)
    return (f'<div class="legend">{sw}<span class="sw path"><i></i>path from the input to the first rigid node</span>'
            '<button type="button" data-act="expand">expand all</button>'
            '<button type="button" data-act="collapse">collapse all</button></div>')


def _json_script(data: Any) -> str:
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f'<script type="application/json" id="mixfx-data">{text}</script>'


def _page(title: str, body: str, data: dict) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f'<main>{body}</main><aside id="details"><h3>details</h3>'
            '<p class="hint">Click a node for its module path, op, symbolic shape and, for a rigid node, '
            "the reason. Click a folded block to expand it.</p><dl></dl></aside>"
            f"{_json_script(data)}<script>{_JS}</script></body></html>\n")


def render_html(report: AnalysisReport) -> str:
    """The whole page for one analysis report."""
    svg, data = _GraphWriter(report, "g0").render()
    body = _header(report) + _legend() + f'<div class="panes"><div class="pane">{svg}</div></div>'
    return _page(f"mixfx: {report.model}", body, {"g0": data})


def render_rewrite_html(before: AnalysisReport, after: AnalysisReport, changes: Sequence[Any]) -> str:
    """Before and after side by side; rewritten nodes (and nodes only one side has) are marked."""
    by_node = {c.node: f"{c.before} \u2192 {c.after}" for c in changes}
    by_module = {c.module: f"{c.before} \u2192 {c.after}" for c in changes if getattr(c, "module", None)}
    before_names = {n.name for n in before.nodes}
    after_names = {n.name for n in after.nodes}

    def marks(report: AnalysisReport, other: set[str], missing: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for n in report.nodes:
            if n.name in by_node:
                out[n.name] = by_node[n.name]
            elif n.module in by_module and n.op != "get_attr":
                out[n.name] = by_module[n.module]
            elif n.name not in other:
                out[n.name] = missing
        return out

    svg_b, data_b = _GraphWriter(before, "before", marks(before, after_names, "removed by the rewrite")).render()
    svg_a, data_a = _GraphWriter(after, "after", marks(after, before_names, "added by the rewrite")).render()
    e = html.escape
    table = "".join(f"<tr><td><code>{e(c.module or c.node)}</code></td><td>{e(c.before)}</td><td>{e(c.after)}</td></tr>"
                    for c in changes) or '<tr><td colspan="3">no changes</td></tr>'
    body = (f'<section class="summary"><h2>rewrite of {e(before.model)}: '
            f'<span class="verdict v-{e(before.classification)}">{e(before.classification)}</span> \u2192 '
            f'<span class="verdict v-{e(after.classification)}">{e(after.classification)}</span></h2>'
            f'<details{" open" if len(changes) <= 10 else ""}><summary>{len(changes)} rewritten node(s)</summary>'
            f'<table class="changes"><tr><th>module</th><th>before</th><th>after</th></tr>{table}</table>'
            "</details></section>"
            + _legend() + '<span class="sw changed-key"><i></i>changed by the rewrite</span>'
            f'<div class="panes two"><div class="pane">{_header(before, "before")}{svg_b}</div>'
            f'<div class="pane">{_header(after, "after")}{svg_a}</div></div>')
    return _page(f"mixfx rewrite: {before.model}", body, {"before": data_b, "after": data_a})


def _write_atomic(text: str, path: str | os.PathLike) -> None:
    """Temp file in the target's directory, then os.replace: readers never see half a page."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_html(report: AnalysisReport, path: str | os.PathLike) -> None:
    """Write `render_html(report)` to `path` atomically."""
    _write_atomic(render_html(report), path)


def write_rewrite_html(before: AnalysisReport, after: AnalysisReport, changes: Sequence[Any],
                       path: str | os.PathLike) -> None:
    """Write the rewrite diff page (changes: objects with .node, .module, .before, .after) atomically."""
    _write_atomic(render_rewrite_html(before, after, changes), path)


_CSS = """
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
 display:flex;align-items:flex-start}
main{flex:1;padding:12px 18px;min-width:0}
aside#details{position:sticky;top:0;width:340px;height:100vh;overflow:auto;box-sizing:border-box;padding:12px 16px;
 border-left:1px solid #ccc;background:#fafafa}
aside dl{margin:0}aside dt{font-weight:600;margin-top:8px;color:#555;font-size:12px;text-transform:uppercase}
aside dd{margin:2px 0 0 0;word-break:break-word}.hint{color:#666;font-size:13px}
code,.l1,.l2,.frame-title,dd.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace}
h2{margin:4px 0 6px}.sentence{margin:4px 0 8px;max-width:70em}
.verdict{font-size:14px;padding:2px 8px;border-radius:10px;color:#fff;background:#555;vertical-align:middle}
.v-convolutional{background:#2f7d32}.v-polymorphic{background:#8a5cc2}.v-fixed{background:#d62728}
.facts th{text-align:left;padding-right:12px;color:#555;font-weight:600}
.constraints ul,.rigid-list ol{margin:2px 0 8px}.constraints ul{padding-left:18px}
.pill{font-size:11px;padding:0 6px;border-radius:8px;color:#fff}
.legend{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;margin:8px 0;font-size:13px}
.sw i{display:inline-block;width:14px;height:14px;border:1px solid #555;border-radius:3px;margin-right:5px;vertical-align:-2px}
.sw.path i{border:3px solid #d62728;background:#fff}.changed-key i{border:3px dashed #0057d9;background:#fff}
.panes.two{display:flex;gap:16px}.pane{overflow:auto}.pane .summary h2{font-size:16px}
svg.graph{display:block}
.box,.frame{stroke:#666;stroke-width:1}.frame{fill:#f7f7f7;stroke-dasharray:4 3}
.item{cursor:pointer}.node text,.collapsed-view text{font-size:11px;pointer-events:none}.l1{font-weight:600}
.frame-title{font-size:12px;font-weight:600;fill:#333;cursor:pointer}
.edge{fill:none;stroke:#999;stroke-width:1.2}.edge.on-rigid-path{stroke:#d62728;stroke-width:2.6}
.on-rigid-path>.box,.on-rigid-path>.collapsed-view>.box,.on-rigid-path>.expanded-view>.frame{stroke:#d62728;stroke-width:3}
.changed>.box,.changed>.collapsed-view>.box,.changed>.expanded-view>.frame{stroke:#0057d9;stroke-width:3;stroke-dasharray:6 3}
.node.selected>.box{stroke:#000;stroke-width:3}
.block:not(.expanded)>.expanded-view{display:none}.block.expanded>.collapsed-view{display:none}
""" + "".join(
    f".status-{s}>.box,.status-{s}>.collapsed-view>.box,.sw.status-{s} i,.pill.status-{s}{{fill:{c};background:{c}}}\n"
    for s, c in STATUS_FILL.items()) + """
.status-rigid>text,.status-rigid>.collapsed-view>text{fill:#fff}
table.changes{border-collapse:collapse;margin:6px 0}table.changes td,table.changes th{border:1px solid #ccc;padding:2px 8px;text-align:left}
"""

# Geometry lives here so that expanding a block only re-runs layout(); constants match Python's.
_JS = r"""
(function(){
const DATA = JSON.parse(document.getElementById('mixfx-data').textContent);
const NODE_W=230, BLOCK_W=250, ROW_H=42, GAP_X=22, GAP_Y=30, PAD=16, HEAD=24;
function place(el,x,y){el.setAttribute('transform','translate('+x+','+y+')');}
function route(a,b,span,rows,lane){
  const sx=a.x+a.w/2, sy=a.y+a.h, ex=b.x+b.w/2, ey=b.y;
  if(span<=1){const m=(sy+ey)/2;return 'M'+sx+','+sy+' C'+sx+','+m+' '+ex+','+m+' '+ex+','+ey;}
  const lx=lane;
  return 'M'+sx+','+sy+' C'+sx+','+(sy+14)+' '+lx+','+(sy+2)+' '+lx+','+(sy+24)+
         ' L'+lx+','+(ey-24)+' C'+lx+','+(ey-2)+' '+ex+','+(ey-14)+' '+ex+','+ey;
}
// Lay out rows of items inside `root`; size(i) gives [w,h]; returns the bounding size.
function layoutRows(rows, items, size, edgesRoot, top){
  const box={}, layerOf={}, rowRight=[], rowLeft=[];
  let widths=rows.map(r=>r.reduce((s,i)=>s+size(i)[0],0)+GAP_X*(r.length-1));
  const W=Math.max(...widths, NODE_W), cx=PAD+W/2;
  let y=top;
  rows.forEach((r,k)=>{
    let x=cx-widths[k]/2, h=0;
    r.forEach(i=>{const [w,hh]=size(i); box[i]={x:x,y:y,w:w,h:hh}; layerOf[i]=k; place(items[i],x,y); x+=w+GAP_X; h=Math.max(h,hh);});
    rowLeft[k]=cx-widths[k]/2; rowRight[k]=cx+widths[k]/2; y+=h+GAP_Y;
  });
  let maxLane=PAD+W, minLane=PAD, n=0;
  edgesRoot.querySelectorAll(':scope>path').forEach(p=>{
    const u=+p.dataset.u, v=+p.dataset.v, a=box[u], b=box[v]; if(!a||!b) return;
    const span=layerOf[v]-layerOf[u]; let lane=0;
    if(span>1){
      const left=(a.x+a.w/2)<cx; let ext=left?Infinity:-Infinity;
      for(let k=layerOf[u]+1;k<layerOf[v];k++) ext=left?Math.min(ext,rowLeft[k]):Math.max(ext,rowRight[k]);
      lane=left?ext-12-6*(n%4):ext+12+6*(n%4); n++;
      maxLane=Math.max(maxLane,lane); minLane=Math.min(minLane,lane);
    }
    p.setAttribute('d',route(a,b,span,rows,lane));
  });
  return {w:maxLane+PAD, h:y-GAP_Y+PAD, shift:Math.max(0,PAD-minLane)};
}
function layoutGraph(svg){
  const g=DATA[svg.dataset.graph], items={};
  svg.querySelectorAll(':scope>.item').forEach(el=>items[+el.dataset.i]=el);
  const sizes={};
  Object.keys(g.blocks).forEach(i=>{
    const el=items[i], view=el.querySelector('.expanded-view'), inner={};
    view.querySelectorAll(':scope>.node').forEach(n=>inner[+n.dataset.i]=n);
    if(!el.classList.contains('expanded')){sizes[i]=[BLOCK_W,ROW_H];return;}
    const r=layoutRows(g.blocks[i].rows, inner, ()=>[NODE_W,ROW_H], view.querySelector('.edges'), HEAD+8);
    if(r.shift) Object.values(inner).forEach(n=>{const t=n.transform.baseVal.consolidate().matrix; place(n,t.e+r.shift,t.f);});
    view.querySelector('.edges').setAttribute('transform','translate('+r.shift+',0)');
    const fr=view.querySelector('.frame'); fr.setAttribute('width',r.w+r.shift); fr.setAttribute('height',r.h);
    sizes[i]=[r.w+r.shift,r.h];
  });
  const r=layoutRows(g.rows, items, i=>sizes[i]||[NODE_W,ROW_H], svg.querySelector(':scope>.edges'), PAD);
  if(r.shift) svg.querySelectorAll(':scope>.item').forEach(n=>{const t=n.transform.baseVal.consolidate().matrix; place(n,t.e+r.shift,t.f);});
  svg.querySelector(':scope>.edges').setAttribute('transform','translate('+r.shift+',0)');
  svg.setAttribute('width',r.w+r.shift); svg.setAttribute('height',r.h);
}
function layoutAll(){document.querySelectorAll('svg.graph').forEach(layoutGraph);}
function show(svg,name){
  const d=DATA[svg.dataset.graph].nodes[name]; if(!d) return;
  document.querySelectorAll('.node.selected').forEach(n=>n.classList.remove('selected'));
  const el=svg.querySelector('.node[data-node="'+CSS.escape(name)+'"]'); if(el) el.classList.add('selected');
  const rows=[['graph',Object.keys(DATA).length>1?svg.dataset.graph:null],['node',d.name],['module path',d.module||'(top level)'],['op',d.op],
    ['symbolic shape',d.shape],['status',d.status],['depends on',(d.depends_on||[]).join(', ')||'no input dim'],
    ['receptive field',d.receptive_field],
    ['reason',d.reason||d.detail],['condition',d.condition],['cure',d.cure],['rewrite',d.change],
    ['block',d.block],['inputs',(d.inputs||[]).join(', ')]];
  const dl=document.querySelector('#details dl'); dl.textContent='';
  rows.forEach(([k,v])=>{ if(v===undefined||v===null||v==='') return;
    const dt=document.createElement('dt'); dt.textContent=k; const dd=document.createElement('dd'); dd.textContent=v;
    if(k==='module path'||k==='symbolic shape'||k==='node') dd.className='mono';
    dl.append(dt,dd);});
  document.querySelector('#details .hint').style.display='none';
}
document.addEventListener('click',ev=>{
  const t=ev.target, svg=t.closest&&t.closest('svg.graph');
  const btn=t.closest&&t.closest('button[data-act]');
  if(btn){document.querySelectorAll('.block').forEach(b=>b.classList.toggle('expanded',btn.dataset.act==='expand'));layoutAll();return;}
  const go=t.closest&&t.closest('a.goto');
  if(go){ev.preventDefault(); const sv=go.closest('.pane')?go.closest('.pane').querySelector('svg.graph'):document.querySelector('svg.graph');
    const n=sv.querySelector('.node[data-node="'+CSS.escape(go.dataset.target)+'"]');
    if(n){const b=n.closest('.block'); if(b&&!b.classList.contains('expanded')){b.classList.add('expanded');layoutGraph(sv);}
      show(sv,go.dataset.target); n.scrollIntoView({block:'center'});}
    return;}
  if(!svg) return;
  const node=t.closest('.node');
  if(node){show(svg,node.dataset.node);return;}
  const block=t.closest('.block');
  if(block&&(t.closest('.collapsed-view')||t.classList.contains('frame-title'))){block.classList.toggle('expanded');layoutGraph(svg);}
});
layoutAll();
})();
"""
