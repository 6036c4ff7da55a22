"""Cure: sizes written into the graph as constants (a view/reshape to the example's grid, an
`nn.Fold` with a fixed `output_size`) are computed from the runtime shape instead.

Which constant is which size is found at the example: a view splits or merges runs of its
input's dims; a run that follows the input gets its sizes from the input's runtime sizes, or,
where it splits one dim into several, from the nearest map `[B, C, h, w]` above the node whose
grid sizes are among the constants (else the first constant becomes the quotient, as in a window
partition `(h // ws, ws)`). The pass re-probes afterwards: a view that still fails is refused.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from passes._cure_probe import Probe, nearest_grids

VIEWS = ("view", "reshape")


def _is_view(node: Node) -> bool:
    return (node.op == "call_method" and node.target in VIEWS
            or node.op == "call_function" and node.target in (torch.reshape, torch.Tensor.view, torch.Tensor.reshape))


def _view_sizes(node: Node) -> tuple[list[Any], bool] | None:
    sizes = list(node.args[1:])
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    if packed:
        sizes = list(sizes[0])
    if "shape" in node.kwargs:
        sizes, packed = list(node.kwargs["shape"]), True
    if not sizes or not all(isinstance(s, (int, Node)) and not isinstance(s, bool) for s in sizes):
        return None
    return sizes, packed


def _groups(shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input dims with runs of output dims of equal element count (what a row-major
    view does: each run of outputs splits or merges a run of inputs)."""
    groups, i, j = [], 0, 0
    while i < len(shape_in) or j < len(shape_out):
        gi, gj = [], []
        p_in, p_out = 1, 1
        if i < len(shape_in):
            p_in *= shape_in[i]
            gi.append(i)
            i += 1
        if j < len(shape_out):
            p_out *= shape_out[j]
            gj.append(j)
            j += 1
        while p_in != p_out:
            if p_in < p_out and i < len(shape_in):
                p_in *= shape_in[i]
                gi.append(i)
                i += 1
            elif p_out < p_in and j < len(shape_out):
                p_out *= shape_out[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
        # size-1 inputs (a 1x1 window grid at the example) go with the group before them, not
        # with the next output dim: [B, 1, 1, 7, 7, C] -> (-1, 7, 7, C) keeps its window size 7
        while i < len(shape_in) and shape_in[i] == 1 and (j >= len(shape_out) or shape_out[j] != 1):
            gi.append(i)
            i += 1
    return groups


class _Builder:
    """Inserts `size()` and arithmetic nodes before `at`."""

    def __init__(self, gm: GraphModule, at: Node):
        self.gm, self.at = gm, at
        self.created: list[Node] = []

    def node(self, op: str, target: Any, args: tuple) -> Node:
        with self.gm.graph.inserting_before(self.at):
            n = self.gm.graph.create_node(op, target, args)
        self.created.append(n)
        return n

    def size(self, source: Node, dim: int) -> Node:
        return self.node("call_method", "size", (source, dim))

    def product(self, items: list[Any]) -> Any:
        out = items[0]
        for item in items[1:]:
            out = self.node("call_function", operator.mul, (out, item))
        return out

    def undo(self) -> None:
        for n in reversed(self.created):
            self.gm.graph.erase_node(n)
        self.created = []


def cure_view(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """A view/reshape with sizes of the example's grid as constants: each run of output dims gets
    its sizes from the run of input dims it splits or merges (`_groups`) at run time:
    - merged or 1:1: the product of the input's runtime sizes;
    - split: the constants equal to the nearest grid's sizes become those sizes (tokens ->
      `[B, h, w, C]`, windows -> `[B, nh, nw, ws, ws, C]`); otherwise the first constant becomes
      the runtime size divided by the others (a window partition `(h // ws, ws)`)."""
    if not _is_view(node):
        return None
    parsed = _view_sizes(node)
    source = node.args[0] if node.args else None
    if parsed is None or not isinstance(source, Node):
        return None
    args, packed = parsed
    shape_in, shape_out, changed = probe.shape(source), probe.shape(node), probe.changed_dims(source)
    if shape_in is None or shape_out is None or not changed or len(shape_out) != len(args):
        return None
    groups = _groups(shape_in, shape_out)
    if groups is None:
        return None
    build = _Builder(gm, node)
    new = list(args)
    notes: list[str] = []
    for dims_in, dims_out in groups:
        if not any(d in changed for d in dims_in):
            continue
        if len(dims_out) == 1:  # the size of a merge is the product of what it merges, whatever computed it
            if args[dims_out[0]] != -1:
                new[dims_out[0]] = build.product([build.size(source, d) for d in dims_in])
                notes.append(f"{_label(args[dims_out[0]])} -> the product of its input's runtime sizes")
            continue
        if not any(isinstance(args[j], int) and args[j] > 1 for j in dims_out):
            continue
        if len(dims_in) != 1:
            build.undo()
            return None
        split = _split(build, source, dims_in[0], [args[j] for j in dims_out], probe, allow_minus_one=-1 not in args)
        if split is None:
            build.undo()
            return None
        values, note = split
        for j, v in zip(dims_out, values):
            new[j] = v
        notes.append(note)
    if not notes:
        return None
    if "shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "shape": tuple(new)}
    elif packed:
        node.args = (source, tuple(new))
    else:
        node.args = (source, *new)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    return f"{name}{tuple(args)}: " + "; ".join(notes)


def _split(build: _Builder, source: Node, dim: int, parts: list[Any], probe: Probe,
           allow_minus_one: bool = False) -> tuple[list[Any], str] | None:
    """Sizes for `parts` (constants and nodes) splitting `source`'s dim `dim` at run time."""
    total_p = probe.shape(source, False)[dim]
    consts = [k for k, p in enumerate(parts) if isinstance(p, int) and p > 1]
    for grid, (gi, gj) in nearest_grids(source, probe):
        ge, gp = probe.shape(grid), probe.shape(grid, False)
        pos = _subsequence([parts[k] for k in consts], [ge[gi], ge[gj]])
        if pos is None:
            continue
        others = [parts[k] for k in consts if k not in (consts[pos[0]], consts[pos[1]])]
        checkable = all(isinstance(p, int) and p != -1 for p in parts)
        if checkable and math.prod(others) * gp[gi] * gp[gj] != total_p:
            continue
        values = list(parts)
        values[consts[pos[0]]] = build.size(grid, gi)
        values[consts[pos[1]]] = build.size(grid, gj)
        return values, f"{ge[gi]}, {ge[gj]} -> the runtime grid of `{grid.name}`"
    for grid, (gi, gj) in nearest_grids(source, probe)[:1]:  # a count of windows: nh*nw of the window grid
        ge = probe.shape(grid)
        k = next((k for k in consts if parts[k] == ge[gi] * ge[gj]), None)
        if k is None:
            continue
        values = list(parts)
        values[k] = build.product([build.size(grid, gi), build.size(grid, gj)])
        computed = [m for m, p in enumerate(parts) if isinstance(p, Node)]
        if allow_minus_one and len(computed) == 1 and -1 not in parts:
            values[computed[0]] = -1  # `B*nW // 64` (the batch, computed with the old count): the rest
        return values, f"{parts[k]} -> {ge[gi]}*{ge[gj]}, the runtime window count (cells of `{grid.name}`)"
    if not consts:
        return None
    first = consts[0]
    rest = [p for k, p in enumerate(parts) if k != first and not (isinstance(p, int) and p == -1)]
    nodes = [p for p in rest if not isinstance(p, int)]
    divisor = math.prod(p for p in rest if isinstance(p, int))
    divisor = build.product(nodes + [divisor]) if nodes else divisor
    values = list(parts)
    values[first] = build.node("call_function", operator.floordiv, (build.size(source, dim), divisor))
    return values, f"{parts[first]} -> runtime size // the other sizes"


def _label(arg: Any) -> str:
    return str(arg) if isinstance(arg, int) else f"`{arg.name}`"


def _subsequence(values: list[int], wanted: list[int]) -> tuple[int, int] | None:
    """Positions of `wanted` (two values, in order) in `values`."""
    for a in range(len(values)):
        if values[a] != wanted[0]:
            continue
        for b in range(a + 1, len(values)):
            if values[b] == wanted[1]:
                return a, b
    return None


def _fold_config(gm: GraphModule, node: Node) -> dict | None:
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Fold):
        m = gm.get_submodule(str(node.target))
        return {"output_size": m.output_size, "kernel_size": m.kernel_size, "dilation": m.dilation,
                "padding": m.padding, "stride": m.stride}
    if node.op == "call_function" and node.target in (F.fold, torch.nn.functional.fold):
        names = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")
        cfg = {"dilation": 1, "padding": 0, "stride": 1, **dict(zip(names[1:], node.args[1:])), **node.kwargs}
        return cfg
    return None


def cure_fold(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """`fold(x, output_size=(H0, W0))`: the output size read off the map of that size above it."""
    cfg = _fold_config(gm, node)
    if cfg is None or not node.args or not isinstance(node.args[0], Node):
        return None
    out = cfg["output_size"]
    out = (out, out) if isinstance(out, int) else tuple(out)
    if not all(isinstance(s, int) for s in out):
        return None
    for grid, (i, j) in nearest_grids(node.args[0], probe):
        ge = probe.shape(grid)
        if (ge[i], ge[j]) != out:
            continue
        with gm.graph.inserting_before(node):
            h = gm.graph.call_method("size", (grid, i))
            w = gm.graph.call_method("size", (grid, j))
            kwargs = {k: cfg[k] for k in ("kernel_size", "dilation", "padding", "stride")}
            new = gm.graph.call_function(F.fold, (node.args[0], (h, w)), kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return f"fold output_size {out} -> the runtime size of `{grid.name}`"
    return None


def regroups_at_probe(node: Node, probe: Probe) -> bool:
    """A view that runs at the probe size but no longer pairs its input and output dims as it did
    at the example (a hard-coded size with a -1 that silently absorbs the change: `reshape(B, 196,
    -1)` of `[B*N, 16, 24]` gives `[B, 196, 384 * N/196]`): the graph fails later, at an innocent
    node, so the view itself is the one to cure."""
    if not _is_view(node) or not node.args or not isinstance(node.args[0], Node):
        return False
    source = node.args[0]
    ins, outs = probe.shape(source), probe.shape(node)
    ins_p, outs_p = probe.shape(source, False), probe.shape(node, False)
    if None in (ins, outs, ins_p, outs_p) or len(ins) != len(ins_p) or len(outs) != len(outs_p):
        return False
    groups = _groups(ins, outs)
    if groups is None:
        return False
    return any(math.prod(ins_p[i] for i in gi) != math.prod(outs_p[j] for j in gj) for gi, gj in groups)


def splits_off_grid_count(node: Node, probe: Probe) -> bool:
    """A view that splits a dim that follows the input (windows x batch) into `-1` (or a size
    computed with the old count, `B*nW // 64`) and a constant
    equal to the cell count of the grid above it (`view(-1, 64, heads, N, N)` with 8x8 windows):
    at another size the -1 takes the whole change and the windows land in the wrong place, with
    no error, until a table indexed by window (an attention mask) meets them, or never."""
    if not _is_view(node) or not node.args or not isinstance(node.args[0], Node):
        return False
    parsed = _view_sizes(node)
    source = node.args[0]
    ins, outs, changed = probe.shape(source), probe.shape(node), probe.changed_dims(source)
    if parsed is None or ins is None or outs is None or not changed or len(outs) != len(parsed[0]):
        return False
    args = parsed[0]
    grids = nearest_grids(source, probe)
    if not grids:
        return False
    grid, (gi, gj) = grids[0]
    ge = probe.shape(grid)
    for dims_in, dims_out in _groups(ins, outs) or []:
        if len(dims_in) == 1 and dims_in[0] in changed and len(dims_out) > 1:
            values = [args[j] for j in dims_out]
            hidden = -1 in values or any(isinstance(v, Node) for v in values)
            if hidden and ge[gi] * ge[gj] in values:
                return True
    return False
