"""Cure: a fixed-size table added to the tokens or to a map (a position embedding, a coordinate
buffer), or multiplied with them (rotary cos/sin tables), is resampled to the runtime grid.

What the node does decides, not what it is called: an add whose one operand depends on the input
and whose other operand is a constant subgraph (parameters, buffers, slices of them) that stops
matching at another input size. The runtime grid comes from the graph: `size()` nodes read off
the nearest map `[B, C, h, w]` (or `[B, h, w, C]`) the tokens were flattened from. The resampling
is timm's `resample_abs_pos_embed` (prefix tokens kept, bicubic, antialiased), and the table is
returned unchanged at the example grid, so outputs there are bit-equal to the original's.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from passes._cure_probe import Probe, constant_roots, nearest_grids, runtime_sides, value_depends_on_input

# a table added to the data (position embedding) or multiplied with it (rotary cos/sin tables)
COMBINES = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}


def _same_grid(size: tuple, example: tuple) -> bool:
    """True at the example grid with concrete sizes; never decided on symbolic sizes (the
    analyser's symbolic run must not see a branch that would pin the grid to one size). The
    helpers below are plain torch code, so a saved GraphModule that calls them re-traces (as
    `torch.load` does) into their ops; there the branch is gone, and the antialiased bicubic and
    the align-corners bilinear resampling are exact identities at the same size anyway."""
    return all(isinstance(s, int) for s in size) and tuple(size) == tuple(example)


def _interpolate(grid: torch.Tensor, size: tuple, mode: str) -> torch.Tensor:
    dtype = grid.dtype
    if mode == "linear":  # coordinate ramps: end points kept, a linspace stays a linspace
        out = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=True)
    else:
        out = F.interpolate(grid.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.to(dtype)


def resample_token_table(table: torch.Tensor, h, w, example_grid: tuple[int, int], token_dim: int,
                         prefix: int, mode: str = "bicubic") -> torch.Tensor:
    """`table` holds `prefix + gh*gw` entries along `token_dim` (row-major grid after the prefix
    tokens): the grid part resampled to `h x w`, prefix kept. Unchanged at the example grid."""
    if _same_grid((h, w), example_grid):
        return table
    t = table.movedim(token_dim, -1)
    flat = t.reshape(1, -1, t.shape[-1])
    head, grid = flat[..., :prefix], flat[..., prefix:]
    grid = _interpolate(grid.reshape(1, flat.shape[1], example_grid[0], example_grid[1]), (h, w), mode)
    out = torch.cat([head, grid.reshape(1, flat.shape[1], h * w)], dim=-1)
    return out.reshape(t.shape[:-1] + (prefix + h * w,)).movedim(-1, token_dim)


def resample_map_table(table: torch.Tensor, h, w, dims: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """`table` is a map whose dims `dims` are the grid: resampled to `h x w`. Unchanged at its own size."""
    if _same_grid((h, w), (table.shape[dims[0]], table.shape[dims[1]])):
        return table
    t = table.movedim(dims, (-2, -1))
    grid = _interpolate(t.reshape(1, -1, t.shape[-2], t.shape[-1]), (h, w), mode)
    return grid.reshape(t.shape[:-2] + (h, w)).movedim((-2, -1), dims)


def _is_add(node: Node) -> bool:
    return (node.op == "call_function" and node.target in COMBINES
            or node.op == "call_method" and node.target in ("add", "add_", "mul", "mul_"))


def _affine_ramp(values: torch.Tensor, dims: tuple[int, int]) -> bool:
    """A coordinate buffer: every value is affine along both grid axes (a linspace/arange grid)."""
    t = values.detach().double().movedim(dims, (-2, -1))
    if t.shape[-1] < 3 or t.shape[-2] < 3:
        return False
    d2h, d2w = t.diff(n=2, dim=-2), t.diff(n=2, dim=-1)
    scale = float(t.abs().max()) or 1.0
    return float(d2h.abs().max()) <= 1e-6 * scale and float(d2w.abs().max()) <= 1e-6 * scale


def _mode(gm: GraphModule, table: Node, dims_in_table: tuple[int, int] | None, rank: int | None = None) -> str:
    """Bicubic for learned tables (timm's choice); linear with end points kept for a buffer that
    is an affine coordinate ramp (bicubic would bend it). `dims_in_table` index a tensor of rank
    `rank`; the buffer read is aligned to it from the right, as broadcasting does."""
    params = {k for k, _ in gm.named_parameters()}
    roots = constant_roots(table)
    if dims_in_table is None or len(roots) != 1 or roots[0].target in params:
        return "bicubic"
    try:
        value = gm.get_buffer(str(roots[0].target))
    except AttributeError:
        try:
            value = getattr(gm, str(roots[0].target))
        except AttributeError:
            return "bicubic"
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return "bicubic"
    offset = (rank if rank is not None else value.dim()) - value.dim()
    dims = (dims_in_table[0] - offset, dims_in_table[1] - offset)
    if min(dims) < 0:
        return "bicubic"
    return "linear" if _affine_ramp(value, dims) else "bicubic"


def cure_position_add(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """Resample the constant operand of the failing add `node` to the runtime grid. Returns a
    description of the change, or None when `node` is not such an add (or the grid is unknown)."""
    if not _is_add(node) or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    if value_depends_on_input(a) and not value_depends_on_input(b):
        data, table = a, b
    elif value_depends_on_input(b) and not value_depends_on_input(a):
        data, table = b, a
    else:
        return None
    data_shape, table_shape = probe.shape(data), probe.shape(table)
    changed = probe.changed_dims(data)
    if data_shape is None or table_shape is None or not changed:
        return None
    offset = len(data_shape) - len(table_shape)  # broadcasting aligns from the right
    if offset < 0:
        return None
    if len(changed) == 2:  # a map: the table's matching dims are the grid
        dims = (changed[0] - offset, changed[1] - offset)
        if min(dims) < 0 or any(table_shape[d] != data_shape[d + offset] for d in dims):
            return None
        mode = _mode(gm, table, dims, len(table_shape))
        with gm.graph.inserting_before(node):
            h = gm.graph.call_method("size", (data, changed[0]))
            w = gm.graph.call_method("size", (data, changed[1]))
            new = gm.graph.call_function(resample_map_table, (table, h, w, dims, mode))
        node.replace_input_with(table, new)
        return (f"{_describe(table)} {list(table_shape)} resampled ({mode}) to the runtime "
                f"{_dimname(changed)} of the map it is added to")
    if len(changed) != 1:
        return None
    token_dim = changed[0] - offset
    if token_dim < 0 or table_shape[token_dim] != data_shape[changed[0]]:
        return None
    n_e = data_shape[changed[0]]
    n_p = probe.shape(data, at_example=False)[changed[0]]
    found = token_grid(data, probe, n_e, n_p)
    if found is None:
        return None
    grid, (i, j), (sh, sw), prefix = found
    ge = probe.shape(grid)
    eh, ew = ge[i] // sh, ge[j] // sw
    mode = _mode(gm, table, None)
    with gm.graph.inserting_before(node):
        h, w = runtime_sides(gm, grid, (i, j), (sh, sw))
        new = gm.graph.call_function(resample_token_table, (table, h, w, (eh, ew), token_dim, prefix, mode))
    node.replace_input_with(table, new)
    kept = f", {prefix} prefix token(s) kept" if prefix else ""
    source = f"`{grid.name}`" + (f" // ({sh}, {sw})" if sh > 1 or sw > 1 else "")
    return (f"{_describe(table)} {list(table_shape)} resampled ({mode}) from the {eh}x{ew} grid to the "
            f"runtime grid of {source}{kept}")


MAX_PREFIX = 8  # class, distillation and register tokens before the grid


def token_grid(data: Node, probe: Probe, n_e: int, n_p: int):
    """The grid `n` tokens were made from: `(map, (i, j), (sh, sw), prefix)` with
    `n == prefix + (map.size(i) // sh) * (map.size(j) // sw)` at the example and at the probe size.
    The nearest map above the tokens first, the same stride on both axes and the fewest prefix
    tokens preferred (stride 1: the tokens are the map's positions; stride > 1: the tokens were
    unfolded from it, as in TNT's pixel embedding)."""
    for grid, (i, j) in nearest_grids(data, probe):
        ge, gp = probe.shape(grid), probe.shape(grid, False)
        candidates = []
        for prefix in range(0, min(MAX_PREFIX, n_e - 1) + 1):
            cells = n_e - prefix
            for sh in _divisors(ge[i]):
                if cells % (ge[i] // sh) or ge[j] % (cells // (ge[i] // sh)):
                    continue
                sw = ge[j] // (cells // (ge[i] // sh))
                if (gp[i] // sh) * (gp[j] // sw) + prefix == n_p:
                    candidates.append((sh != sw, sh * sw, prefix, (sh, sw)))
        if candidates:
            _, _, prefix, strides = min(candidates)
            return grid, (i, j), strides, prefix
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cure_concat_table(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """A failing `torch.cat` of maps with a constant map (a coordinate buffer, CoordConv-style,
    possibly expanded to the batch): the constant resampled to the runtime size of the data."""
    if not (node.op == "call_function" and node.target is torch.cat) or not node.args:
        return None
    tensors = node.args[0]
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Node) for t in tensors):
        return None
    data = [t for t in tensors if value_depends_on_input(t)]
    tables = [t for t in tensors if not value_depends_on_input(t)]
    if not data or not tables:
        return None
    changed = probe.changed_dims(data[0])
    shape = probe.shape(data[0])
    if changed is None or len(changed) != 2 or shape is None:
        return None
    done = []
    for table in tables:
        table_shape = probe.shape(table)
        if table_shape is None or len(table_shape) != len(shape) or any(
                table_shape[d] != shape[d] for d in changed):
            return None
        mode = _mode(gm, table, (changed[0], changed[1]), len(table_shape))
        with gm.graph.inserting_before(node):
            h = gm.graph.call_method("size", (data[0], changed[0]))
            w = gm.graph.call_method("size", (data[0], changed[1]))
            new = gm.graph.call_function(resample_map_table, (table, h, w, (changed[0], changed[1]), mode))
        node.replace_input_with(table, new)
        done.append(f"{_describe(table)} {list(table_shape)} resampled ({mode})")
    return "; ".join(done) + " to the runtime size of the map it is concatenated with"


def _describe(table: Node) -> str:
    roots = constant_roots(table)
    names = ", ".join(sorted({str(r.target) for r in roots})) or table.name
    return f"`{names}`"


def _dimname(dims) -> str:
    return "size (dims " + ", ".join(map(str, dims)) + ")"


__all__ = ["resample_token_table", "resample_map_table", "cure_position_add", "cure_concat_table"]
