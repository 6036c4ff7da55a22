"""Cure: sizes written into the graph as constants (a view/reshape to the example's grid, an
`nn.Fold` with a fixed `output_size`) are computed from the runtime shape instead.

Which constant is which size is found at the example: a view splits or merges runs of its
input's dims; a run that follows the input gets its sizes from the input's runtime sizes, or,
where it splits one dim into several, from the nearest map `[B, C, h, w]` above the node whose
grid sizes are among the constants (else the first constant becomes the quotient, as in a window
partition `(h // ws, ws)`). Where the example cannot tell (a grid partition `(g, H // g)` reads
like a window partition; size-1 dims pair either way), the other readings that keep the view a
split or merge at the probe are tried too, each probed, and the one that keeps the graph after it
consistent wins (`cure_view`). A view counts as regrouped where no pairing of its runs of dims
holds at both sizes (`consistent_at_probe`). The pass re-probes afterwards: a view that still
fails is refused.
"""
from __future__ import annotations

import functools
import itertools
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from passes._cure_probe import Probe, nearest_grids, runtime_sides

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
    """A view/reshape with sizes of the example's grid as constants, computed at run time instead.

    At the example a constant does not say which factor of a split follows the input: a window
    partition `view(B, H//w, w, W//w, w, C)` and a grid partition `view(B, g, H//g, g, W//g, C)`
    read `(B, 4, 4, 4, 4, C)` on a 16x16 map, and `(B, 8, 1, 8, 1, C)` has size-1 dims that pair
    with either neighbour. Both choices run at other sizes; only one keeps what the graph does
    after the view (the tokens that a later view gathers, a table over a fixed token count). So
    the candidates (`_by_groups`'s reading first, then every assignment of the input's changes to
    the view's dims that keeps the view's runs of dims apart at the probe, `_assignments`) are
    each tried and probed: the first that leaves no later view regrouped and fails latest wins."""
    if not _is_view(node):
        return None
    parsed = _view_sizes(node)
    source = node.args[0] if node.args else None
    if parsed is None or not isinstance(source, Node):
        return None
    args, packed = parsed
    candidates = [(None, lambda build: _by_groups(build, node, source, args, probe))]
    candidates += _assignments(node, source, args, probe)
    saved = (node.args, node.kwargs)
    best, tried = None, set()
    for rank, (predicted, candidate) in enumerate(candidates[:MAX_CANDIDATES]):
        if predicted is not None and predicted in tried:  # the same sizes at the probe as one tried
            continue
        build = _Builder(gm, node)
        found = candidate(build)
        if found is None:
            build.undo()
            continue
        if len(candidates) == 1:
            best = (None, rank, found)
            break
        _set_sizes(node, source, found[0], packed)
        score, shape = _lookahead(gm, node, probe)
        tried.add(shape)
        node.args, node.kwargs = saved
        build.undo()
        if best is None or score < best[0]:
            best = (score, rank, found)
        if not score[0] and score[1] == 0 and score[3] == 0:  # runs to the end at the probe
            break
    if best is None:
        return None
    if best[0] is not None:  # rebuild the winner (its nodes were undone with the others)
        build = _Builder(gm, node)
        best = (best[0], best[1], candidates[best[1]][1](build))
    values, notes = best[2]
    _set_sizes(node, source, values, packed)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    return f"{name}{tuple(args)}: " + "; ".join(notes)


MAX_CANDIDATES = 8


def _set_sizes(node: Node, source: Node, values: list[Any], packed: bool) -> None:
    if "shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "shape": tuple(values)}
    elif packed:
        node.args = (source, tuple(values))
    else:
        node.args = (source, *values)


def _lookahead(gm: GraphModule, node: Node, probe: Probe) -> tuple[tuple[bool, int, bool, int], Any]:
    """How a candidate leaves the graph at the probe size (smaller is better): whether the view
    itself fails or regroups, how many later views regroup, whether it misses a layout the graph
    had above (`_restores`), and how early the first failure is; and the view's shape there."""
    from passes._cure_probe import run_probe

    after = run_probe(gm, tuple(probe.example.input_shape))
    shape = after.shape(node, False)
    if after.example.failure is not None:
        return (True, 1 << 30, True, 1 << 30), shape
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    here = order[node.name]
    failure = after.failure
    if (failure is not None and failure.node == node.name) or regroups_at_probe(node, after):
        return (True, 0, True, 0), shape
    regrouped = sum(1 for n in gm.graph.nodes if order[n.name] > here and regroups_at_probe(n, after))
    early = 0 if failure is None else len(order) - order.get(failure.node, len(order))
    return (False, regrouped, not _restores(node, after), early), shape


def _restores(node: Node, probe: Probe, most: int = 2000) -> bool:
    """Whether the view gives back, at the probe, the shape of a tensor above it that had its
    shape at the example (a window or grid reverse restores the partition's layout: the batch
    stays the batch, the window grid the window grid)."""
    shape, other = probe.shape(node), probe.shape(node, False)
    seen, stack = {node}, list(node.all_input_nodes)
    while stack and len(seen) < most:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if probe.shape(n) == shape and probe.changed_dims(n):
            if probe.shape(n, False) == other:
                return True
        stack.extend(n.all_input_nodes)
    return False


def _by_groups(build: "_Builder", node: Node, source: Node, args: list[Any], probe: Probe
               ) -> tuple[list[Any], list[str]] | None:
    """Each run of output dims gets its sizes from the run of input dims it splits or merges at
    the example (`_groups`):
    - merged or 1:1: the product of the input's runtime sizes;
    - split: the constants equal to the nearest grid's sizes become those sizes (tokens ->
      `[B, h, w, C]`, windows -> `[B, nh, nw, ws, ws, C]`); otherwise the first constant becomes
      the runtime size divided by the others (a window partition `(h // ws, ws)`)."""
    shape_in, shape_out, changed = probe.shape(source), probe.shape(node), probe.changed_dims(source)
    if shape_in is None or shape_out is None or not changed or len(shape_out) != len(args):
        return None
    groups = _groups(shape_in, shape_out)
    if groups is None:
        return None
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
            return None
        split = _split(build, source, dims_in[0], [args[j] for j in dims_out], probe, allow_minus_one=-1 not in args)
        if split is None:
            return None
        values, note = split
        for j, v in zip(dims_out, values):
            new[j] = v
        notes.append(note)
    return (new, notes) if notes else None


def _assignments(node: Node, source: Node, args: list[Any], probe: Probe) -> list:
    """The other readings of a view written with constants: a pair of constants equal to the
    sizes of a grid above (`nearest_grids`) become its runtime sizes, and each remaining dim of
    the input whose size follows the input is absorbed by one constant (or the -1) of the view,
    the others staying fixed. Only readings that keep the view's runs of dims apart at the probe
    (`consistent_at_probe`) are kept, fewest changed sizes first, each with its sizes at the
    probe."""
    ins_e, ins_p, changed = probe.shape(source), probe.shape(source, False), probe.changed_dims(source)
    outs_e = probe.shape(node)
    if ins_e is None or ins_p is None or not changed or outs_e is None or len(outs_e) != len(args):
        return []
    computed = {j: probe.size(a, False) for j, a in enumerate(args) if isinstance(a, Node)}
    if None in computed.values():  # a size computed in the graph, not known at the probe
        return []
    ints = [j for j, a in enumerate(args) if isinstance(a, int) and a >= 1]
    pairs: list = [None]
    for grid, (gi, gj) in nearest_grids(source, probe)[:4]:
        ge, gp = probe.shape(grid), probe.shape(grid, False)
        pairs += [((a, grid, gi, gp[gi]), (b, grid, gj, gp[gj])) for a in ints for b in ints
                  if a < b and args[a] == ge[gi] and args[b] == ge[gj]]
    numel_p = math.prod(ins_p)
    found: dict[tuple, tuple] = {}
    for pair in pairs:
        taken = {p[0] for p in pair} if pair else set()
        targets = [j for j in ints if j not in taken] + [j for j, a in enumerate(args) if a == -1]
        for choice in itertools.product([None, *targets], repeat=len(changed)):
            absorbed: dict[int, list[int]] = {}
            for i, j in zip(changed, choice):
                if j is not None:
                    absorbed.setdefault(j, []).append(i)
            predicted = list(args)
            for j, v in computed.items():
                predicted[j] = v
            plan: dict[int, Any] = {}
            for p in pair or ():
                predicted[p[0]], plan[p[0]] = p[3], ("grid", p[1], p[2])
            ok = True
            for j, dims in absorbed.items():
                if args[j] == -1:
                    continue
                e, p = math.prod(ins_e[i] for i in dims), math.prod(ins_p[i] for i in dims)
                if args[j] % e == 0:
                    predicted[j], plan[j] = args[j] // e * p, ("times", dims, args[j] // e)
                elif e % args[j] == 0 and p % (e // args[j]) == 0:
                    predicted[j], plan[j] = p // (e // args[j]), ("over", dims, e // args[j])
                else:
                    ok = False
            if not ok or not plan:
                continue
            if -1 in predicted:
                rest = math.prod(v for v in predicted if v != -1)
                if rest == 0 or numel_p % rest:
                    continue
                predicted[predicted.index(-1)] = numel_p // rest
            key = tuple(predicted)
            if key in found or not consistent_at_probe(ins_e, ins_p, outs_e, predicted):
                continue
            found[key] = plan
    plans = sorted(found.items(), key=lambda item: len(item[1]))
    return [(key, functools.partial(_materialise, source=source, args=args, plan=plan)) for key, plan in plans]


def _materialise(build: "_Builder", source: Node, args: list[Any], plan: dict) -> tuple[list[Any], list[str]]:
    values, notes = list(args), []
    for j, (kind, what, k) in sorted(plan.items()):
        if kind == "grid":
            values[j] = build.size(what, k)
            notes.append(f"{args[j]} -> the runtime size of dim {k} of `{what.name}`")
            continue
        sizes = build.product([build.size(source, d) for d in what])
        values[j] = (build.product([sizes, k]) if kind == "times" and k != 1 else sizes if k == 1
                     else build.node("call_function", operator.floordiv, (sizes, k)))
        dims = ", ".join(map(str, what))
        notes.append(f"{args[j]} -> the runtime size of dim {dims} of its input"
                     + (f" // {k}" if kind == "over" and k != 1 else f" * {k}" if k != 1 else ""))
    return values, notes


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
            h, w = runtime_sides(gm, grid, (i, j))
            kwargs = {k: cfg[k] for k in ("kernel_size", "dilation", "padding", "stride")}
            new = gm.graph.call_function(F.fold, (node.args[0], (h, w)), kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return f"fold output_size {out} -> the runtime size of `{grid.name}`"
    return None


def consistent_at_probe(ins: tuple[int, ...], ins_p: tuple[int, ...], outs: tuple[int, ...],
                        outs_p: tuple[int, ...] | list[int]) -> bool:
    """Whether a view splits or merges the same runs of dims at the probe as at the example: the
    dims (those of size 1 at both sizes left out) pair into runs of equal element count at both
    sizes at once, and each run is a split (one input dim) or a merge (one output dim). A `-1`
    that takes a change the hard-coded sizes beside it do not (`reshape(-1, 3136, C)` of
    `[64B, 14, 21, C]`) makes a run of two and two; a size-1 dim that grows beside a constant
    (`view(B, H // 8, 8, ...)` with `H // 8 == 1` at the example) stays a split."""
    if math.prod(ins_p) != math.prod(outs_p):
        return False
    a = [(e, p) for e, p in zip(ins, ins_p) if (e, p) != (1, 1)]
    b = [(e, p) for e, p in zip(outs, outs_p) if (e, p) != (1, 1)]
    i = j = 0
    while i < len(a) or j < len(b):
        if i == len(a) or j == len(b):
            return False
        (ea, pa), (eb, pb) = a[i], b[j]
        n_in, n_out = 1, 1
        i, j = i + 1, j + 1
        while (ea, pa) != (eb, pb):
            if ea <= eb and pa <= pb and i < len(a):
                ea, pa, i, n_in = ea * a[i][0], pa * a[i][1], i + 1, n_in + 1
            elif ea >= eb and pa >= pb and j < len(b):
                eb, pb, j, n_out = eb * b[j][0], pb * b[j][1], j + 1, n_out + 1
            else:
                return False
        if n_in > 1 and n_out > 1:
            return False
    return True


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
    return not consistent_at_probe(ins, ins_p, outs, outs_p)


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
