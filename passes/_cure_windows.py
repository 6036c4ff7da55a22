"""Cure: a constant table indexed by window (Swin's shifted-window attention mask, built at
construction for one resolution's window grid) is rebuilt for the runtime window grid.

Such a table is the same for every window except those in the last row and column of the grid
(the windows that straddle the cyclic shift's wrap-around). That structure is checked on the
table's values; where it holds, the table for any other grid follows: interior windows take the
interior entry, the last row/column their own. Identity at the example grid (the index maps are
`arange`), so outputs there are bit-equal.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from passes._cure_probe import Probe, constant_roots, constant_value, nearest_grids, runtime_sides, value_depends_on_input


def _border_index(n, n_example: int, device) -> torch.Tensor:
    """For a grid of `n` windows: which of the example's `n_example` windows each one copies
    (the last copies the last, the others the interior ones, in order while they last)."""
    idx = torch.arange(n, device=device)
    return torch.where(idx == n - 1, n_example - 1, idx.clamp(max=max(n_example - 2, 0)))


def extend_window_table(table: torch.Tensor, dim: int, nh, nw, example_grid: tuple[int, int]) -> torch.Tensor:
    """`table` has one entry per window along `dim` (`nh_e * nw_e` of them, row-major): the
    entries for an `nh x nw` window grid."""
    eh, ew = example_grid
    t = table.movedim(dim, 0)
    t = t.reshape((eh, ew) + t.shape[1:])
    t = t.index_select(0, _border_index(nh, eh, t.device)).index_select(1, _border_index(nw, ew, t.device))
    return t.reshape((nh * nw,) + t.shape[2:]).movedim(0, dim)


def _interior_is_uniform(value: torch.Tensor, dim: int, eh: int, ew: int) -> bool:
    """Every window of the example grid equals its neighbours except in the last row/column."""
    t = value.movedim(dim, 0).reshape((eh, ew) + value.movedim(dim, 0).shape[1:])
    rows_alike = eh < 3 or bool((t[: eh - 1] == t[:1]).all())
    cols_alike = ew < 3 or bool((t[:, : ew - 1] == t[:, :1]).all())
    return rows_alike and cols_alike and eh >= 2 and ew >= 2


def _is_learned(gm: GraphModule, table: Node) -> bool:
    """Whether the table reads a parameter (masks are buffers built at construction)."""
    params = {name for name, _ in gm.named_parameters()}
    return any(str(r.target) in params for r in constant_roots(table))


def cure_window_table(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """The failing op combines per-window data with a constant table that has one entry per
    window of the example's window grid: the table rebuilt for the runtime grid."""
    if node.op != "call_function" or node.target not in (operator.add, torch.add, operator.iadd):
        return None
    operands = [a for a in node.args[:2] if isinstance(a, Node)]
    data = [a for a in operands if value_depends_on_input(a)]
    tables = [a for a in operands if not value_depends_on_input(a)]
    if len(data) != 1 or len(tables) != 1:
        return None
    data, table = data[0], tables[0]
    if _is_learned(gm, table):  # a learned per-window table (NesT's per-block position embedding) is
        return None            # no mask of borders: it is resampled (`passes._cure_pos`)
    shape, table_shape, changed = probe.shape(data), probe.shape(table), probe.changed_dims(data)
    if shape is None or table_shape is None or not changed or len(changed) != 1:
        return None
    offset = len(shape) - len(table_shape)
    dim = changed[0] - offset
    if dim < 0 or table_shape[dim] != shape[changed[0]]:
        return None
    for grid, (gi, gj) in nearest_grids(data, probe):
        ge = probe.shape(grid)
        if ge[gi] * ge[gj] != table_shape[dim]:
            continue
        value = constant_value(gm, table)
        if not isinstance(value, torch.Tensor) or not _interior_is_uniform(value, dim, ge[gi], ge[gj]):
            return None
        with gm.graph.inserting_before(node):
            nh, nw = runtime_sides(gm, grid, (gi, gj))
            new = gm.graph.call_function(extend_window_table, (table, dim, nh, nw, (ge[gi], ge[gj])))
        node.replace_input_with(table, new)
        return (f"table {list(table_shape)} with one entry per window of the {ge[gi]}x{ge[gj]} window grid "
                f"(alike but for the last row and column) rebuilt for the runtime window grid of `{grid.name}`")
    return None
