"""Cure: sizes written into the graph as constants (a view/reshape to the example's grid, an
`nn.Fold` with a fixed `output_size`) are computed from the runtime shape instead.

Which constant is which size is found at the example: a constant equal to the height of the
nearest map `[B, C, h, w]` above the node becomes `map.size(2)`, one equal to h*w becomes the
product, a pair `(a, b)` with a*b == h becomes `(size // b, b)` (a window partition). The result
is checked at the probe size: the new view's element count must match its input's.
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


class _Sizes:
    """Builds `size()` / arithmetic nodes before `at`, and evaluates them at the probe size."""

    def __init__(self, gm: GraphModule, probe: Probe, at: Node):
        self.gm, self.probe, self.at = gm, probe, at

    def size(self, node: Node, dim: int) -> tuple[Node, int]:
        with self.gm.graph.inserting_before(self.at):
            return self.gm.graph.call_method("size", (node, dim)), self.probe.shape(node, False)[dim]

    def op(self, fn, a: tuple[Node, int], b: tuple[Any, int]) -> tuple[Node, int]:
        with self.gm.graph.inserting_before(self.at):
            return self.gm.graph.call_function(fn, (a[0], b[0])), fn(a[1], b[1])


def _match_sizes(consts: list[Any], axes: list[tuple[Node, int]], probe: Probe, sizes: _Sizes) -> tuple[list[Any], list[Any], list[str]]:
    """Replace the constants equal to the grid sizes, in order. Returns (new args, values at the
    probe size, descriptions)."""
    example = [probe.shape(n)[d] for n, d in axes]
    new, at_probe, notes = [], [], []
    k, i = 0, 0
    while i < len(consts):
        a = consts[i]
        nxt = consts[i + 1] if i + 1 < len(consts) else None
        if isinstance(a, int) and a > 1 and k < len(axes):
            if a == example[k]:
                s = sizes.size(*axes[k])
                new.append(s[0]), at_probe.append(s[1]), notes.append(f"{a} -> size")
                k, i = k + 1, i + 1
                continue
            if k + 1 < len(axes) and a == example[k] * example[k + 1]:
                s = sizes.op(operator.mul, sizes.size(*axes[k]), sizes.size(*axes[k + 1]))
                new.append(s[0]), at_probe.append(s[1]), notes.append(f"{a} -> h*w")
                k, i = k + 2, i + 1
                continue
            if isinstance(nxt, int) and nxt > 1 and a * nxt == example[k]:
                s = sizes.op(operator.floordiv, sizes.size(*axes[k]), (nxt, nxt))
                new += [s[0], nxt]
                at_probe += [s[1], nxt]
                notes.append(f"{a} -> size // {nxt}")
                k, i = k + 1, i + 2
                continue
        new.append(a)
        at_probe.append(a if isinstance(a, int) else None)  # a Node (the batch size): unknown here
        i += 1
    return new, at_probe, notes


def cure_view(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """A view/reshape with the example's sizes as constants: sizes from the runtime grid."""
    if not _is_view(node):
        return None
    parsed = _view_sizes(node)
    source = node.args[0] if node.args else None
    if parsed is None or not isinstance(source, Node):
        return None
    consts, packed = parsed
    numel_probe = probe.shape(source, False)
    if numel_probe is None:
        return None
    numel_probe = math.prod(numel_probe)
    for grid, (i, j) in nearest_grids(source, probe):
        before = list(gm.graph.nodes)
        sizes = _Sizes(gm, probe, node)
        new, at_probe, notes = _match_sizes(consts, [(grid, i), (grid, j)], probe, sizes)
        if notes and _fits(at_probe, new, numel_probe):
            if packed:
                node.args = (node.args[0], tuple(new)) if "shape" not in node.kwargs else node.args
                if "shape" in node.kwargs:
                    node.kwargs = {**node.kwargs, "shape": tuple(new)}
            else:
                node.args = (node.args[0], *new)
            return (f"{node.target if isinstance(node.target, str) else node.target.__name__}"
                    f"{tuple(consts)}: {', '.join(notes)} of `{grid.name}`")
        for n in reversed([n for n in gm.graph.nodes if n not in set(before)]):
            gm.graph.erase_node(n)
    return None


def _fits(at_probe: list[Any], new: list[Any], numel: int) -> bool:
    """The view's sizes at the probe size multiply to its input's element count (-1 allowed).
    Sizes read from other nodes (the batch) are unknown here: the pass's re-probe checks those."""
    known = [v for v, n in zip(at_probe, new) if not (isinstance(n, int) and n == -1)]
    if any(v is None for v in known):
        return True
    prod = math.prod(known)
    if any(isinstance(n, int) and n == -1 for n in new):
        return prod > 0 and numel % prod == 0
    return prod == numel


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
