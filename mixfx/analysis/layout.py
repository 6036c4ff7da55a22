"""Where each tensor dim lies in the input image: the layout algebra behind the locality judgement.

Every dim of a tensor is a list of *atoms*, outer to inner. An atom is a run of `length` positions
along one input axis (`axis` 0 for H, 1 for W, ...; None for channels, heads, batch), `step` input
pixels apart, each position covering `span` input pixels. The input `[B, C, H, W]` is
`[[batch], [chan], [(H, 1, H, 1)], [(W, 1, W, 1)]]`; `x.view(B, C, 4, H//4, ...)` splits the H
atom into `(H, H//4, 4, 1)` (outer: 4 positions a quarter of the image apart) and `(H, 1, H//4, 1)`;
flattening H and W into tokens keeps both atoms in one dim; an adaptive pool to 7 makes
`(H, H/7, 7, H/7)`. The *extent* of a dim along an axis is how many input pixels its positions
cover together: sum of step*(length-1) plus the span. An op that combines the positions of a dim
mixes over that extent; whether the extent grows with the input (compared between two runs at
different sizes) is what separates local from global.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Atom:
    axis: int | None
    step: float
    length: int
    span: float = 1.0


Dim = tuple[Atom, ...]
Layout = tuple[Dim, ...]


def channel(length: int) -> Dim:
    return (Atom(None, 1.0, int(length)),)


def input_layout(shape: Sequence[int]) -> Layout:
    """(batch, channels, *spatial): spatial dim i is input axis i."""
    dims: list[Dim] = [channel(s) for s in shape[:2]]
    dims += [(Atom(i, 1.0, int(s), 1.0),) for i, s in enumerate(shape[2:])]
    return tuple(dims)


def unknown(shape: Sequence[int]) -> Layout:
    return tuple(channel(s) for s in shape)


def extent(dims: Sequence[Dim]) -> dict[int, float]:
    """Input pixels covered along each axis by the positions of these dims together."""
    out: dict[int, float] = {}
    spans: dict[int, float] = {}
    for d in dims:
        for a in d:
            if a.axis is None:
                continue
            out[a.axis] = out.get(a.axis, 0.0) + a.step * (a.length - 1)
            spans[a.axis] = max(spans.get(a.axis, 0.0), a.span)
    return {ax: out[ax] + spans[ax] for ax in out}


def positional(dim: Dim) -> bool:
    """More than one position along some input axis."""
    return any(a.axis is not None and a.length > 1 for a in dim)


def is_positional(layout: Layout) -> bool:
    return any(positional(d) for d in layout)


def dim_length(dim: Dim) -> int:
    return math.prod(a.length for a in dim)


def extend(dim: Dim, new_length: int) -> Dim:
    """Concatenation along a dim: the positions stay where they were; the entries added (a class
    token, register tokens) are not positions. The atoms then cover fewer entries than the dim has."""
    return dim if dim_length(dim) <= new_length else resample(dim, new_length)


def resample(dim: Dim, new_length: int, stride: float = 1.0, extra_span: float = 0.0) -> Dim:
    """A conv/pool/slice/resize along one dim: positions `stride` apart (in this dim's positions)
    each covering `extra_span` more of them."""
    if not dim:
        return channel(new_length)
    if dim_length(dim) < new_length and stride == 1.0 and extra_span == 0.0 and \
            new_length - dim_length(dim) <= 16:
        return dim  # slicing off some of the extra entries of an extended dim
    inner = dim[-1]
    if len(dim) == 1 or dim_length(dim) == new_length:
        if dim_length(dim) == new_length and stride == 1.0 and extra_span == 0.0:
            return dim
        return (Atom(inner.axis, inner.step * stride, int(new_length), inner.span + extra_span * inner.step),)
    # several atoms (flattened tokens): the innermost changes, the outer ones keep their count
    outer = math.prod(a.length for a in dim[:-1])
    if new_length % outer == 0:
        return (*dim[:-1], Atom(inner.axis, inner.step * stride, new_length // outer,
                                inner.span + extra_span * inner.step))
    return (Atom(inner.axis, inner.step * stride, int(new_length), inner.span + extra_span * inner.step),)


def reduce_dim(dim: Dim) -> Dim:
    """A dim summed/averaged over: one position that covers the whole former extent."""
    ext = extent([dim])
    if not ext:
        return channel(1)
    return tuple(Atom(ax, 1.0, 1, e) for ax, e in ext.items())


def reshape(layout: Layout, old: Sequence[int], new: Sequence[int]) -> Layout:
    """A view/reshape: a dim kept at its size (at a group boundary) keeps its atoms; elsewhere the
    old atoms are dealt out to the new dims in order, an atom split where a new dim ends inside it."""
    old, new = [int(s) for s in old], [int(s) for s in new]
    if math.prod(old) != math.prod(new):
        return unknown(new)
    out: list[Dim] = []
    pending: list[Atom] = []  # atoms of old dims not yet dealt out
    i = 0
    for size in new:
        while not pending and i < len(old) and old[i] == 1:
            i += 1  # old size-1 dims carry nothing
        if not pending and i < len(old) and old[i] == size:
            out.append(layout[i])  # kept whole (also a dim with extra non-positional entries)
            i += 1
            continue
        if size == 1:
            out.append(channel(1))
            continue
        taken: list[Atom] = []
        have = 1
        while have < size:
            if not pending:
                if i >= len(old):
                    return unknown(new)
                d = layout[i]
                # a dim with extra entries (class token) cannot be split into named positions
                pending = [a for a in d if a.length != 1] if dim_length(d) == old[i] else list(channel(old[i]))
                i += 1
                continue
            a = pending.pop(0)
            if have * a.length <= size:
                taken.append(a)
                have *= a.length
            else:
                need = size // have
                if size % have or a.length % need:
                    return unknown(new)
                rest = a.length // need
                taken.append(Atom(a.axis, a.step * rest, need, a.span))
                pending.insert(0, Atom(a.axis, a.step, rest, a.span))
                have *= need
        if have != size:
            return unknown(new)
        out.append(tuple(taken))
    return tuple(out)


def permute(layout: Layout, dims: Sequence[int]) -> Layout:
    return tuple(layout[d] for d in dims)


def broadcast(layouts: Sequence[tuple[Layout, Sequence[int]]], shape: Sequence[int]) -> Layout:
    """Elementwise op with broadcasting: each output dim from an input that has it at full size
    (right-aligned), positional ones preferred."""
    out: list[Dim] = []
    rank = len(shape)
    for k in range(rank):
        best: Dim | None = None
        for layout, sh in layouts:
            j = k - (rank - len(sh))
            if j < 0 or int(sh[j]) != int(shape[k]):
                continue
            if best is None or (positional(layout[j]) and not positional(best)):
                best = layout[j]
        out.append(best if best is not None else channel(shape[k]))
    return tuple(out)
