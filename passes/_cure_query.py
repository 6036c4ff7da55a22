"""Cure: a map brought to the attention window's grid by a fixed number of downsamplings (GCViT's
global query: 56x56 max-pooled three times to the 7x7 window) is pooled adaptively to that grid.

At another size the fixed chain gives another grid (14x21 at 448x672) and the map meets the
window's tokens, whose count is fixed (49), in a view or an attention product, and fails. The
cure inserts an adaptive pool to the example's grid after the last op that still has that grid
(max where that op is a max pool, as the chain's own downsampling; else mean): the identity at the
example size, a summary of the whole map at the window's size elsewhere. There is no exact
equivalent: the model built for the larger size has more downsampling levels, with weights of
their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from passes._cure_probe import Probe, nearest_grids, value_depends_on_input

VIEWS = ("view", "reshape")
MAX_POOLS = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
MAX_POOL_FUNCTIONS = (F.max_pool2d, F.adaptive_max_pool2d, torch.max_pool2d)


def _tensor_operands(node: Node) -> list[Node]:
    if node.op == "call_method" and node.target in VIEWS:
        return [node.args[0]] if node.args and isinstance(node.args[0], Node) else []
    return [a for a in node.args[:2] if isinstance(a, Node)]


def _size_args(node: Node) -> list[Node]:
    if not (node.op == "call_method" and node.target in VIEWS):
        return []
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return [s for s in sizes if isinstance(s, Node)]


def _keeps_count(node: Node, grown: Node, cells: int, probe: Probe) -> bool:
    """Another input-dependent operand of `node` (or a size it is given, read off the input)
    has `cells` at both sizes: the window's tokens, whose count does not follow the input."""
    for other in _tensor_operands(node):
        if other is grown or not value_depends_on_input(other):
            continue
        a, b = probe.shape(other), probe.shape(other, False)
        if a is not None and b is not None and len(a) == len(b) and any(x == y == cells for x, y in zip(a, b)):
            return True
    return any(probe.size(s) == probe.size(s, False) == cells for s in _size_args(node))


def _same_grid_source(grid: Node, dims: tuple[int, int], probe: Probe) -> Node:
    """Up from `grid` through ops that keep its grid (a permute, a norm, an activation) to the
    op that made it (the last downsampling)."""
    cells = probe.shape(grid)[dims[0]] * probe.shape(grid)[dims[1]]
    node = grid
    while True:
        parents = [p for p in node.all_input_nodes if value_depends_on_input(p)]
        if len(parents) != 1:
            return node
        parent = parents[0]
        shape, changed = probe.shape(parent), probe.changed_dims(parent)
        if shape is None or changed is None or len(changed) != 2 or shape[changed[0]] * shape[changed[1]] != cells:
            return node
        node = parent


def _is_max_pool(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), MAX_POOLS)
    return node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS


def cure_pooled_grid(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """The failing op meets a map whose grid follows the input (`grown`) with a token count that
    does not, equal to the map's cells at the example: the map pooled adaptively to its example
    grid, right after the op that made it."""
    for grown in _tensor_operands(node):
        if not value_depends_on_input(grown):
            continue
        for grid, dims in nearest_grids(grown, probe)[:2]:
            ge = probe.shape(grid)
            cells = ge[dims[0]] * ge[dims[1]]
            if not _keeps_count(node, grown, cells, probe):
                continue
            source = _same_grid_source(grid, dims, probe)
            shape, changed = probe.shape(source), probe.changed_dims(source)
            if shape is None or len(shape) != 4 or changed is None or len(changed) != 2:
                continue
            size = (shape[changed[0]], shape[changed[1]])
            pool = F.adaptive_max_pool2d if _is_max_pool(gm, source) else F.adaptive_avg_pool2d
            users = list(source.users)
            with gm.graph.inserting_after(source):
                moved = gm.graph.call_function(torch.movedim, (source, tuple(changed), (2, 3)))
            with gm.graph.inserting_after(moved):
                pooled = gm.graph.call_function(pool, (moved, size))
            with gm.graph.inserting_after(pooled):
                back = gm.graph.call_function(torch.movedim, (pooled, (2, 3), tuple(changed)))
            for user in users:
                user.replace_input_with(source, back)
            kind = "max" if pool is F.adaptive_max_pool2d else "mean"
            return (f"`{source.name}` (its {size[0]}x{size[1]} grid meets a fixed count of {cells} tokens): "
                    f"pooled ({kind}, adaptive) to {size[0]}x{size[1]} at any size")
    return None
