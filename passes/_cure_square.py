"""A graph that runs on square grids only: a constraint (`H == W`), not a rigid node.

Code that takes a grid's side from a token count (`s = int(N ** 0.5)`, `math.sqrt(T)`, as
ConViT's gated attention or NesT's deblockify do) assumes a square grid. At a size with H != W
the side comes out wrong and a view or an expand fails; at another square size it is right. That
node needs no cure: the cured model takes inputs with `H == W`. The cure pass asks here, for a
node that fails at its (non-square) probe size and has no cure, whether the graph gets past it at
a square size; from then on it probes at that square size, and the verification picks square sizes.
Only a square example can tell this (at a non-square example the model does not assume a square).
"""
from __future__ import annotations

from typing import Sequence

import torch.fx

from passes._cure_probe import Probe, run_probe

SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def is_square(shape: Sequence[int]) -> bool:
    """Whether the spatial dims of `shape` ([B, C, *spatial]) are two or more and all equal."""
    spatial = tuple(shape)[2:]
    return len(spatial) > 1 and len(set(spatial)) == 1


def square_probe_shape(example_shape: Sequence[int]) -> tuple[int, ...] | None:
    """The square probe size: every side x2 (every divisibility the example meets is kept); None
    for a non-square example."""
    shape = tuple(example_shape)
    if not is_square(shape):
        return None
    return shape[:2] + tuple(2 * s for s in shape[2:])


def square_constraint(example_shape: Sequence[int]) -> str:
    """`H == W` (`D == H == W` for volumes), in the names the analysis uses."""
    rank = len(tuple(example_shape)) - 2
    names = SPATIAL_NAMES.get(rank, tuple(f"S{i}" for i in range(rank)))
    return " == ".join(names)


def square_sizes(example_shape: Sequence[int], step: int = 32) -> list[tuple[int, ...]]:
    """Square sizes to verify a square-only model at, in order of cost: the example side -step,
    +step, x2, x3 (x2 and x3 keep every divisibility the example meets; a block or window model
    needs them)."""
    shape = tuple(example_shape)
    side = max(shape[2:])
    sides = [s for s in (side - step, side + step, 2 * side, 3 * side) if s > side // 2]
    return [shape[:2] + (s,) * (len(shape) - 2) for s in dict.fromkeys(sides)]


def passes_on_square(gm: torch.fx.GraphModule, example_shape: Sequence[int], failing: str) -> Probe | None:
    """The probe at the square size where the node `failing` (the first failure at the non-square
    probe) runs there: the graph fails later or not at all. None where it fails there as well, or
    where the example is not square."""
    other = square_probe_shape(example_shape)
    if other is None:
        return None
    probe = run_probe(gm, example_shape, other)
    if probe.example.failure is not None:
        return None
    if probe.failure is None:
        return probe
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    if probe.failure.node == failing or order.get(probe.failure.node, -1) <= order.get(failing, -1):
        return None
    return probe
