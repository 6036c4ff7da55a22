"""Reading a patch layout off an index-valued probe.

Patch extraction is spelled many ways (view/permute/reshape, `F.unfold`, `Tensor.unfold` twice,
einops `rearrange`, flatten orders `c p1 p2`, `p1 p2 c`, ...). Rather than match each spelling, the
pass pushes `arange(1, numel + 1)` shaped like the chain's source through the chain and reads, for
every feature of every token of the Linear's input, which source element landed there. If those
positions are exactly "token t = patch (b, g1..gd) of a grid with stride k, feature f = (c, o1..od)
at the same offsets in every token", the Linear over that input is a strided conv with kernel k,
whatever the spelling. Anything else (overlap, padding, a permute mixing patches) fails one of the
checks below, which names the reason.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


class NotPatchify(Exception):
    """The chain is not a patch extraction; `str(exc)` is the reason in plain words."""


@dataclass(frozen=True)
class PatchLayout:
    """How a Linear's input was cut out of `source` (shape `source_shape` at the probe size).

    Source axes: `batch_dim` (0), `channel_dim` (1 for NC..., last for N...C) and `spatial_dims`.
    `feature_index[f] = (c, o_1, ..., o_d)`: the channel and in-patch offsets of feature f, for the
    weight reorder. Token axes are (b, g_1, ..., g_d); `token_order` is the order in which they are
    laid out and `token_groups` which of them each leading dim of the Linear input flattens."""

    source_shape: tuple[int, ...]
    channel_dim: int
    spatial_dims: tuple[int, ...]
    kernel: tuple[int, ...]
    grid: tuple[int, ...]
    feature_index: torch.Tensor  # [F, 1 + d] long
    token_order: tuple[int, ...]
    token_groups: tuple[tuple[int, ...], ...]
    flatten_order: str

    @property
    def channels_last(self) -> bool:
        return self.channel_dim != 1

    @property
    def in_channels(self) -> int:
        return self.source_shape[self.channel_dim]


def index_probe(shape: tuple[int, ...]) -> torch.Tensor:
    """`1..numel` in float64 (exact up to 2**53; float so im2col-style ops accept it). 0 is left
    free to mark padding."""
    n = math.prod(shape)
    return torch.arange(1, n + 1, dtype=torch.float64).reshape(shape)


WHOLE_DIMS = "each feature vector spans whole dims instead of patches on a grid: not a patch embedding"


def read_layout(source_shape: tuple[int, ...], probed: torch.Tensor, require_grid: bool = True) -> PatchLayout:
    """The patch layout behind `probed` (the probe after the chain: `[*tokens, F]`), or raise
    `NotPatchify` with the reason. `require_grid=False` accepts a 1-wide grid (patch == whole
    dim), which only a probe at another size can tell from a Linear over whole dims."""
    rank = len(source_shape)
    if rank < 3 or rank > 5:
        raise NotPatchify(f"the chain starts from a rank-{rank} tensor; patch embeddings start from "
                          "[B, C, *spatial] with 1 to 3 spatial dims")
    if probed.dim() < 2:
        raise NotPatchify("the Linear input has no token dim")
    small = probed.numel() < 2**31 - 1
    idx = probed.round().to(torch.int32 if small else torch.long)  # int32: half the memory traffic
    if not torch.equal(idx.to(probed.dtype), probed):
        raise NotPatchify("the chain changes values, not only their positions")
    if (idx == 0).any():
        raise NotPatchify("the patches contain padding (zeros that are not input elements)")
    flat = idx.reshape(-1) - 1
    if int(torch.bincount(flat.long() if not small else flat).max()) > 1:  # (torch.unique sorts: 10x slower here)
        raise NotPatchify("an input element appears in more than one patch (overlapping patches)")
    token_shape = tuple(probed.shape[:-1])
    features = probed.shape[-1]
    coords = [c.reshape(-1, features) for c in _unravel(flat, source_shape)]  # per source dim: [rows, F]

    if not (coords[0] == coords[0][:, :1]).all():
        raise NotPatchify("a feature vector mixes batch elements")
    problems = []
    for channel_dim in dict.fromkeys((1, rank - 1)):
        try:
            return _layout_with_channel(source_shape, coords, token_shape, channel_dim, require_grid)
        except NotPatchify as exc:
            problems.append(exc)
    raise problems[0]


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    out = []
    for size in reversed(shape):
        quotient = flat // size
        out.append(flat - quotient * size)
        flat = quotient
    return out[::-1]


def _layout_with_channel(source_shape, coords, token_shape, channel_dim, require_grid) -> PatchLayout:
    rank = len(source_shape)
    rows, features = coords[0].shape
    spatial = tuple(d for d in range(1, rank) if d != channel_dim)
    channel = coords[channel_dim]
    if not (channel == channel[:1]).all():
        raise NotPatchify("the channel of a feature differs between tokens")
    kernel, grid, offsets, cells = [], [], [], []
    for dim in spatial:
        pos = coords[dim]
        low = pos.min(dim=1, keepdim=True).values
        off = pos - low
        if not (off == off[:1]).all():
            raise NotPatchify("the pixels of a patch are not at the same offsets in every token "
                              "(a permute mixes patches across tokens)")
        k = int(off.max()) + 1
        if torch.unique(off[0]).numel() != k:
            raise NotPatchify("a patch gathers pixels that are not contiguous (strided or dilated sampling)")
        if (low % k != 0).any():
            raise NotPatchify(f"patches along dim {dim} are not aligned to a grid of stride {k}")
        kernel.append(k)
        grid.append(source_shape[dim] // k)
        offsets.append(off[0])
        cells.append((low[:, 0] // k))
    if all(k == 1 for k in kernel):
        raise NotPatchify("each token is a single position (kernel 1): a plain Linear, left to linear_to_conv")
    if require_grid and not has_grid(kernel, grid):
        raise NotPatchify(WHOLE_DIMS)

    feature_index = torch.stack([channel[0]] + offsets, dim=1).long()  # [F, 1 + d]
    channels = source_shape[channel_dim]
    if features != channels * math.prod(kernel):
        raise NotPatchify(f"a feature vector holds {features} values, a {'x'.join(map(str, kernel))} patch of "
                          f"{channels} channels has {channels * math.prod(kernel)}")
    batch = source_shape[0]
    if rows != batch * math.prod(grid):
        raise NotPatchify(f"the {rows} tokens do not cover the {batch}x{'x'.join(map(str, grid))} patch grid")

    token_coords = torch.stack([coords[0][:, 0]] + cells, dim=1).long()  # [rows, 1 + d]: (b, g1..gd)
    sizes = (batch, *grid)
    order = _axis_order(token_coords, sizes)
    if order is None:
        raise NotPatchify("the tokens are not laid out in grid order (a permute mixes patches across tokens)")
    groups = _group(tuple(sizes[a] for a in order), token_shape)
    if groups is None:
        raise NotPatchify(f"the token dims {list(token_shape)} are not a flattening of the patch grid")
    names = ["c"] + [f"p{i + 1}" for i in range(len(kernel))]
    f_order = _axis_order(feature_index, (channels, *kernel))
    return PatchLayout(
        source_shape=tuple(source_shape), channel_dim=channel_dim, spatial_dims=spatial, kernel=tuple(kernel),
        grid=tuple(grid), feature_index=feature_index, token_order=order,
        token_groups=tuple(tuple(order[i] for i in g) for g in groups),
        flatten_order=" ".join(names[a] for a in f_order) if f_order is not None else "irregular",
    )


def has_grid(kernel: tuple[int, ...] | list[int], grid: tuple[int, ...] | list[int]) -> bool:
    """Some dim is cut into several patches of more than one element."""
    return any(k > 1 and n > 1 for k, n in zip(kernel, grid))


def _axis_order(coords: torch.Tensor, sizes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The order of axes such that row i of `coords` is the i-th element of a row-major walk
    over `sizes` in that order; None if no order of the axes gives that."""
    want = torch.arange(coords.shape[0])
    for order in itertools.permutations(range(len(sizes))):  # at most 4! = 24
        flat = torch.zeros_like(want)
        for a in order:
            flat = flat * sizes[a] + coords[:, a]
        if torch.equal(flat, want):
            return order
    return None


def _group(sizes: tuple[int, ...], target: tuple[int, ...]) -> list[list[int]] | None:
    """Split positions of `sizes` into consecutive (possibly empty) groups whose products are
    `target`; size-1 axes join the group on their left."""
    groups: list[list[int]] = []
    i = 0
    for t in target:
        group, prod = [], 1
        while i < len(sizes) and prod * sizes[i] <= t and (prod < t or sizes[i] == 1):
            group.append(i)
            prod *= sizes[i]
            i += 1
        if prod != t:
            return None
        groups.append(group)
    while i < len(sizes) and sizes[i] == 1 and groups:
        groups[-1].append(i)
        i += 1
    return groups if i == len(sizes) else None
