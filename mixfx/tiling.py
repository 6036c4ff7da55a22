"""Exact tiled inference: run a network with a bounded receptive field tile by tile and get what
the whole-image run returns, to float rounding, with memory bounded by the tile.

How (per spatial axis, from `mixfx.receptive_field`): output position i reads input pixels
`[S*i + lo, S*i + hi]`. The output is cut into runs of positions that own `tile` input pixels each;
a run [a, b) needs input `[S*a + lo, S*(b-1) + hi]`, widened outwards to multiples of the
alignment A (the lcm of every intermediate stride's numerator, so that each pooling and upsampling
grid inside the tile sits on the whole image's grid) and clipped to the image. Clipping at the image
border makes the tile's own zero padding the model's; inside the image the tile sees its real
neighbours, and every output position whose field could reach the tile's edge lies outside the
cropped run. The crop of each tile's output is pasted into the result.

MONAI's `sliding_window_inference` blends overlapping windows instead (approximate near seams);
`bench/tile.py` measures both.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Sequence

import torch
import torch.fx
from torch import nn

from mixfx.errors import AnalysisError, InputSpecError
from mixfx.receptive_field import AxisMap, FieldRun, compute_fields
from mixfx.tracing import Leaf, trace


class NotTileableError(AnalysisError):
    """The map asked for has no bounded receptive field (global context or mixing on the way)."""

    kind = "not_tileable"


def tile(model: nn.Module, x: torch.Tensor, tile: int | Sequence[int] = 512, *, up_to: str | None = None,
         leaves: Sequence[Leaf] = ()) -> torch.Tensor:
    """Run `model` on `x` tile by tile; return what the whole-image run returns at the target map.

    The target is the model's output when it is spatial (a fully convolutional net: the result
    equals `model(x)`); otherwise the pre-head map, the last spatial map before the head (for a
    classifier, the features its global pool reads: `layer4`'s output for a ResNet). `up_to` names
    another node (fx node name or module path) whose output to reproduce. `tile` is the input
    pixels each tile owns per spatial axis, rounded down to a multiple of the alignment (the total
    stride); each tile also reads a halo of about half the receptive field on each side.

    Runs under `torch.no_grad()`, in the model's current mode (call `model.eval()` first:
    BatchNorm with batch statistics is not tileable). Raises `NotTileableError` naming the node
    where the receptive field becomes unbounded (GroupNorm statistics, a squeeze-excite gate,
    attention, an op without a rule) and why."""
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        raise InputSpecError(f"tile() needs a tensor of shape (batch, channels, *spatial); got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.",
                             "Pass the whole image as one tensor, e.g. 1x3x4096x4096.")
    n_axes = x.dim() - 2
    tile_sizes = _per_axis(tile, n_axes)
    traced = trace(model, torch.empty(x.shape, dtype=x.dtype, device="meta"), leaves=leaves)
    gm = traced.graph_module
    run = compute_fields(gm, x.shape, inference=False)
    target = _target(gm, run, up_to, _varying(gm, run, x.shape))
    field = run.fields[target]
    if field.unbounded is None and not run.is_spatial(target):
        raise NotTileableError(f"tile(): the receptive field of `{target}` could not be followed to the input.",
                               "Pass up_to= an earlier spatial map.")
    if field.unbounded is not None:
        u = field.unbounded
        raise NotTileableError(
            f"Cannot tile {type(model).__name__}: the receptive field of `{target}` is unbounded from "
            f"`{u.module or u.node}` (node {u.node}): {u.reason}. A tile would not see what that op sees, so "
            "the tiled result would differ from the whole-image run.",
            "Tile only up to a map before that node (up_to=...), or run the whole image.")
    axes = field.axes()
    out_shape = run.shapes[target]
    plans = [_plan_axis(axes[k][1], x.shape[2 + k], out_shape[axes[k][0]], tile_sizes[k]) for k in range(n_axes)]
    _check_tile_shapes(gm, run, target, x.shape, plans)
    runner = _runner(model, gm, run, target)
    result = None
    with torch.no_grad():
        for pieces in itertools.product(*plans):
            window = [slice(None), slice(None)] + [slice(p.start, p.end) for p in pieces]
            y = runner(x[tuple(window)])
            if not isinstance(y, torch.Tensor):
                raise AnalysisError(f"tile(): `{target}` returned {type(y).__name__}, not a tensor.",
                                    "Pass up_to= the node of one spatial map.")
            if result is None:
                result = y.new_empty(out_shape)
            src = [slice(None)] * y.dim()
            dst = [slice(None)] * y.dim()
            for k, p in enumerate(pieces):
                d = axes[k][0]
                src[d] = slice(p.a - p.offset, p.b - p.offset)
                dst[d] = slice(p.a, p.b)
            result[tuple(dst)] = y[tuple(src)]
    assert result is not None
    return result


class _Piece:
    """One tile along one axis: output run [a, b), input window [start, end), output offset."""

    __slots__ = ("a", "b", "start", "end", "offset")

    def __init__(self, a: int, b: int, start: int, end: int, offset: int):
        self.a, self.b, self.start, self.end, self.offset = a, b, start, end, offset

    def __repr__(self) -> str:
        return f"out[{self.a}:{self.b}] <- in[{self.start}:{self.end}]"


def _per_axis(tile: int | Sequence[int], n: int) -> list[int]:
    sizes = [int(tile)] * n if isinstance(tile, int) else [int(t) for t in tile]
    if len(sizes) != n or any(t < 1 for t in sizes):
        raise InputSpecError(f"tile={tile!r}: give one positive size per spatial axis ({n}).",
                             "e.g. tile=(512, 512) for an image.")
    return sizes


def plan_axis(m: AxisMap, n_in: int, n_out: int, tile: int) -> list[_Piece]:
    """The tiles along one axis (public for the bench and tests)."""
    return _plan_axis(m, n_in, n_out, tile)


def _plan_axis(m: AxisMap, n_in: int, n_out: int, tile: int) -> list[_Piece]:
    s = m.stride
    align = math.lcm(m.align, s.numerator)
    core = max(align, tile // align * align)
    pieces: list[_Piece] = []
    t0 = 0
    a = 0
    while a < n_out:
        last = t0 + core >= n_in
        b = n_out if last else min(n_out, math.ceil(Fraction(t0 + core) / s))
        if b > a:
            need_lo = math.floor(s * a + m.lo)
            need_hi = math.floor(s * (b - 1) + m.hi)
            start = max(0, need_lo // align * align)
            end = min(n_in, -(-(need_hi + 1) // align) * align)
            offset = Fraction(start) / s
            assert offset.denominator == 1, (start, s)
            pieces.append(_Piece(a, b, start, end, int(offset)))
            a = b
        if last:
            break
        t0 += core
    return pieces


def _varying(gm: torch.fx.GraphModule, run: FieldRun, shape) -> set[str] | None:
    """Nodes whose shape changes with the input size, from a meta run at a second size (the
    first that runs of a few near the image's)."""
    for delta in (-64, 64, -32, 32, -96, 96, 128):
        other = (*shape[:2], *(max(8, n + delta) for n in shape[2:]))
        try:
            return run.varying(compute_fields(gm, other, inference=False))
        except Exception:  # noqa: BLE001 - a size the model does not take: try another
            continue
    return None


def _target(gm: torch.fx.GraphModule, run: FieldRun, up_to: str | None, varying: set[str] | None = None) -> str:
    if up_to is None:
        target = run.pre_head(varying)
        if target is None:
            raise NotTileableError("tile(): the model has no spatial map to tile (no node keeps the input's "
                                   "spatial axes).", "Check the input shape, or pass up_to=.")
        return target
    by_module = [n.name for n in gm.graph.nodes  # the last node inside that module: its output
                 if n.op != "output" and (_module_of(n) or "").startswith(up_to)
                 and (_module_of(n) == up_to or _module_of(n)[len(up_to)] == ".")]
    names = {n.name for n in gm.graph.nodes}
    name = up_to if up_to in names else (by_module[-1] if by_module else None)
    if name is None:
        raise InputSpecError(f"tile(up_to={up_to!r}): no node or module of that name in the traced graph.",
                             "Use a node name from `mixfx analyze --nodes` or a module path such as 'layer4'.")
    if not run.is_spatial(name) and run.fields[name].unbounded is None:
        raise NotTileableError(f"tile(up_to={up_to!r}): node `{name}` is not a spatial map.",
                               "Pick a node whose output keeps the input's spatial axes.")
    return name


def _module_of(n: torch.fx.Node) -> str | None:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0] or None
    return None


def _check_tile_shapes(gm, run: FieldRun, target: str, shape, plans: list[list[_Piece]]) -> None:
    """Each distinct tile shape must give the target the whole image's field and cover its run:
    an op whose behaviour depends on the input size (a resize to another tensor's size at an odd
    size, a centre crop) would otherwise tile wrong."""
    whole = run.fields[target]
    seen = set()
    for pieces in itertools.product(*plans):
        tshape = (*shape[:2], *(p.end - p.start for p in pieces))
        if tshape in seen:
            continue
        seen.add(tshape)
        try:
            other = compute_fields(gm, tshape, inference=False)
        except Exception as exc:  # noqa: BLE001 - the model cannot run at this tile size
            raise NotTileableError(
                f"tile(): the model does not run on a {'x'.join(map(str, tshape[2:]))} tile ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).",
                "Use a larger tile, or one that is a multiple of the model's total stride.") from exc
        f = other.fields.get(target)
        if f is None or f.unbounded is not None or not _same_maps(f, whole):
            raise NotTileableError(
                f"tile(): at the tile size {'x'.join(map(str, tshape[2:]))} the receptive field of `{target}` "
                "differs from the whole image's: an op's geometry depends on the input size.",
                "Use a tile size that is a multiple of the model's total stride, or run the whole image.")
        for k, p in enumerate(pieces):
            d = f.axes()[k][0]
            if other.shapes[target][d] < p.b - p.offset:
                raise NotTileableError(f"tile(): a {'x'.join(map(str, tshape[2:]))} tile yields too few output "
                                       "positions.", "Use a larger tile.")


def _same_maps(a, b) -> bool:
    return all((x is None) == (y is None) and (x is None or (x.axis, x.stride, x.lo, x.hi) == (y.axis, y.stride,
                                                                                                y.lo, y.hi))
               for x, y in zip(a.dims, b.dims)) and len(a.dims) == len(b.dims)


def _runner(model: nn.Module, gm: torch.fx.GraphModule, run: FieldRun, target: str):
    """The eager model when the target is its whole (single tensor) output, else the traced graph
    cut at the target."""
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if out_node.args and isinstance(out_node.args[0], torch.fx.Node) and out_node.args[0].name == target:
        return model
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        env[node.name] = graph.node_copy(node, lambda a: env[a.name])
        if node.name == target:
            break
    graph.output(env[target])
    sub = torch.fx.GraphModule(gm, graph, f"{type(model).__name__}UpTo_{target}")
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


__all__ = ["tile", "plan_axis", "NotTileableError"]
