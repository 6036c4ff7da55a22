"""Cure: a constant attention bias over all token pairs of one grid (a relative-position bias
table gathered with an index buffer built for that grid: BEiT, ViT-relpos) is rebuilt for the
runtime grid.

The bias `B[q, k]` of a relative-position scheme depends only on the offset between the two
grid positions. That is checked on the bias's values at the example (every pair with the same
offset has the same value, per head; prefix-token rows and columns are the same for every grid
token); then the per-offset table `T[dy, dx]` is read off the bias, resized to the runtime grid's
offsets (`(2h-1) x (2w-1)`, bicubic as timm's `resize_rel_pos_bias_table` does) and gathered into
the runtime bias. At the example grid the bias is returned unchanged (bit-equal outputs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from passes._cure_pos import token_grid
from passes._cure_probe import Probe, constant_value, runtime_sides, value_depends_on_input


def _grid_offsets(h, w, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy + h - 1, dx + w - 1) for every (query, key) pair of an h x w grid, row-major."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return ys[:, None] - ys[None, :] + (h - 1), xs[:, None] - xs[None, :] + (w - 1)


def offset_table(bias: torch.Tensor, eh: int, ew: int, prefix: int) -> torch.Tensor:
    """`T[..., dy, dx]` from a bias `[..., N, N]` over `prefix + eh*ew` tokens (each offset read
    at one representative pair)."""
    grid = bias[..., prefix:, prefix:]
    dy = torch.arange(2 * eh - 1, device=bias.device) - (eh - 1)
    dx = torch.arange(2 * ew - 1, device=bias.device) - (ew - 1)
    qy, qx = dy.clamp(min=0), dx.clamp(min=0)  # query at (max(dy,0), max(dx,0)), key = query - offset
    q = qy[:, None] * ew + qx[None, :]
    k = (qy - dy)[:, None] * ew + (qx - dx)[None, :]
    return grid[..., q, k]


def rebuild_relative_bias(bias: torch.Tensor, h, w, example_grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """The bias `[..., N, N]` for an `h x w` grid (plus the same prefix tokens)."""
    eh, ew = example_grid
    if all(isinstance(s, int) for s in (h, w)) and (h, w) == (eh, ew):
        return bias
    table = offset_table(bias, eh, ew, prefix)
    lead = table.shape[:-2]
    flat = table.reshape(1, -1, 2 * eh - 1, 2 * ew - 1).float()
    flat = F.interpolate(flat, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False, antialias=True)
    table = flat.reshape(lead + (2 * h - 1, 2 * w - 1)).to(bias.dtype)
    oy, ox = _grid_offsets(h, w, bias.device)
    grid = table[..., oy, ox]
    if not prefix:
        return grid
    n = h * w
    first = bias[..., :prefix, prefix:prefix + 1].expand(lead + (prefix, n))  # prefix -> grid tokens
    to_prefix = bias[..., prefix:prefix + 1, :prefix].expand(lead + (n, prefix))  # grid tokens -> prefix
    top = torch.cat([bias[..., :prefix, :prefix], first], dim=-1)
    bottom = torch.cat([to_prefix, grid], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def _is_relative(value: torch.Tensor, eh: int, ew: int, prefix: int) -> bool:
    """Whether the bias depends only on the offset between grid positions (and prefix rows and
    columns are alike for every grid token): rebuilding it at the example grid gives it back."""
    try:
        table = offset_table(value, eh, ew, prefix)
        oy, ox = _grid_offsets(eh, ew, value.device)
        if not torch.equal(table[..., oy, ox], value[..., prefix:, prefix:]):
            return False
        if prefix:
            rows, cols = value[..., :prefix, prefix:], value[..., prefix:, :prefix]
            return bool((rows == rows[..., :1]).all() and (cols == cols[..., :1, :]).all())
        return True
    except (IndexError, RuntimeError):
        return False


def cure_relative_bias(gm: GraphModule, node: Node, probe: Probe) -> str | None:
    """The failing node meets attention over `N` tokens with a constant `[..., N, N]` bias (an
    add to the logits, or `scaled_dot_product_attention(attn_mask=...)`)."""
    operands = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, Node)]
    data = [a for a in operands if value_depends_on_input(a)]
    for bias in [a for a in operands if not value_depends_on_input(a)]:
        shape = probe.shape(bias)
        if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
            continue
        n_e = shape[-1]
        for tokens in data:
            t_shape, changed = probe.shape(tokens), probe.changed_dims(tokens)
            if t_shape is None or not changed or t_shape[changed[0]] != n_e:
                continue
            n_p = probe.shape(tokens, at_example=False)[changed[0]]
            found = token_grid(tokens, probe, n_e, n_p)
            if found is None:
                continue
            grid, (i, j), (sh, sw), prefix = found
            ge = probe.shape(grid)
            eh, ew = ge[i] // sh, ge[j] // sw
            value = constant_value(gm, bias)
            if not isinstance(value, torch.Tensor) or not _is_relative(value, eh, ew, prefix):
                return None
            with gm.graph.inserting_before(node):
                h, w = runtime_sides(gm, grid, (i, j), (sh, sw))
                new = gm.graph.call_function(rebuild_relative_bias, (bias, h, w, (eh, ew), prefix))
            node.replace_input_with(bias, new)
            kept = f", {prefix} prefix token(s)" if prefix else ""
            return (f"relative-position bias {list(shape)} over the {eh}x{ew} grid{kept} rebuilt for the runtime "
                    f"grid of `{grid.name}` (per-offset table resized bicubic)")
    return None
