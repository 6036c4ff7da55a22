"""Where a fixed-size model breaks, and which dims of each node follow the input size.

The cure pass runs the graph on meta tensors (no compute; `mixfx.shapes.propagate_concrete`) at
the example size and at a second, larger size with H != W. A dim whose size differs between the
two runs follows the input ("changed"); the first node that fails at the second size is the next
thing to cure. Meta runs cost milliseconds, so the pass re-probes after every cure.
"""
from __future__ import annotations

import operator

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch.fx
from torch.fx import Node

from mixfx.shapes import (ConcreteRun, NodeFailure, _is_false, _MetaInterpreter, _propagate, _shape_of, _short,
                          classify_exception, meta_weights)
from passes._fxutil import depends_on_input


def probe_shape(example_shape: Sequence[int]) -> tuple[int, ...]:
    """The second size: spatial dims x2, x3, ... (every divisibility the example meets is kept,
    and H != W even for a square example, so height and width can be told apart)."""
    shape = tuple(example_shape)
    return shape[:2] + tuple(s * (2 + i) for i, s in enumerate(shape[2:]))


@dataclass
class Probe:
    """Shapes of every node reached at the example size and at the probe size."""

    example: ConcreteRun
    other: ConcreteRun

    @property
    def failure(self):
        return self.other.failure

    def shape(self, node: Node, at_example: bool = True) -> tuple[int, ...] | None:
        value = (self.example if at_example else self.other).shapes.get(node.name)
        return tuple(value) if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value) else None

    def size(self, node: Node, at_example: bool = True) -> int | None:
        """The int a node computed (a size read off a tensor, arithmetic on sizes); None where
        unknown (not reached, or a run on real tensors)."""
        return (self.example if at_example else self.other).sizes.get(node.name)

    def changed_dims(self, node: Node) -> list[int] | None:
        """The dims of `node`'s output whose size follows the input; None where unknown."""
        a, b = self.shape(node), self.shape(node, at_example=False)
        if a is None or b is None or len(a) != len(b):
            return None
        return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def run_probe(gm: torch.fx.GraphModule, example_shape: Sequence[int],
              other_shape: Sequence[int] | None = None) -> Probe:
    """Both runs on meta tensors; on real tensors (random input, real compute) where the graph
    cannot run on meta ones (an op without a meta kernel, a tensor made on the CPU inside the
    forward, e.g. `torch.arange(n)`). `other_shape`: the second size (default `probe_shape`; a
    square one where the graph runs on square grids only, `passes._cure_square`)."""
    shape = tuple(example_shape)
    other = tuple(other_shape) if other_shape is not None else probe_shape(example_shape)
    example = _meta_run(gm, shape)
    if _needs_real(example):
        return Probe(_propagate(gm, shape, real=True), _propagate(gm, other, real=True))
    at_other = _meta_run(gm, other)
    if _needs_real(at_other):
        at_other = _propagate(gm, other, real=True)
    elif at_other.failure is None:  # an opaque helper (timm's autowrapped functions) that fails on real
        new = [name for name in at_other.probe_failures if name not in example.probe_failures]
        if new:  # values at this size only: an index built for the example's size, out of bounds here
            at_other.failure = NodeFailure(new[0], at_other.probe_failures[new[0]] + " (on real zeros)", "shape")
    return Probe(example, at_other)


def _needs_real(run: ConcreteRun) -> bool:
    return run.failure is not None and (run.failure.kind in ("data_dependent", "unsupported")
                                        or "device" in run.failure.error)


def _meta_run(gm: torch.fx.GraphModule, input_shape: tuple[int, ...]) -> ConcreteRun:
    """`mixfx.shapes`' meta propagation (each node's shape, the first failure, the failed checks),
    with its value probes of opaque helpers except the cures' own (the cure re-probes after every
    change: probing its resampling helpers on real zeros at the larger size cost 6x the time)."""
    run = ConcreteRun(input_shape)

    class _Recorder(_MetaInterpreter):
        def run_node(self, n):
            out = super().run_node(n)
            run.shapes[n.name] = _shape_of(out)
            if isinstance(out, int) and not isinstance(out, bool):
                run.sizes[n.name] = out
            return out

        def call_function(self, target, args, kwargs):
            if not getattr(target, "__module__", "").startswith("passes."):
                return super().call_function(target, args, kwargs)
            saved, self.probe_values = self.probe_values, False  # the cures' own helpers take any size
            try:
                return super().call_function(target, args, kwargs)
            finally:
                self.probe_values = saved

    interp = _Recorder(gm, probe_values=True)
    with meta_weights(gm), torch.no_grad():
        try:
            interp.run(torch.empty(input_shape, device="meta"))
        except Exception as exc:  # noqa: BLE001 - the failing node is the finding
            node = interp.current.name if interp.current is not None else "?"
            run.failure = NodeFailure(node, _short(exc), classify_exception(exc))
    run.failed_asserts = [name for name, cond in interp.skipped_asserts.items() if _is_false(cond)]
    run.probe_failures = interp.probe_failures
    return run


def constant_roots(node: Node) -> list[Node]:
    """The get_attr nodes a constant subgraph reads."""
    seen, stack, roots = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            roots.append(n)
        stack.extend(n.all_input_nodes)
    return roots


def _scaled_apart(probe: Probe, node: Node, dims: list[int]) -> bool:
    """The probe scales H by 2 and W by 3: a height and a width grow apart, while the two token
    dims of an attention matrix `[.., N, N]` grow together (and are no grid). A square probe
    (for a graph that runs on square grids only) scales both sides alike: there a side grows like
    the input's side, a token count like its area (x2 against x4)."""
    a, b = probe.shape(node), probe.shape(node, False)
    i, j = dims
    side = _square_scale(probe)
    if side is None:
        return a[i] * b[j] != a[j] * b[i]
    return all(0 < a[d] and b[d] / a[d] < side ** 1.5 for d in (i, j))


def _square_scale(probe: Probe) -> float | None:
    """The factor a square probe scales every spatial side by; None for a probe that scales them apart."""
    a, b = tuple(probe.example.input_shape)[2:], tuple(probe.other.input_shape)[2:]
    ratios = {y / x for x, y in zip(a, b) if x}
    return ratios.pop() if len(a) > 1 and len(ratios) == 1 and len(set(b)) == 1 else None


def nearest_grids(node: Node, probe: Probe, limit: int = 50_000, most: int = 8) -> list[tuple[Node, tuple[int, int]]]:
    """Ancestors of `node` (itself first, then breadth-first upwards, at most `most`) whose output
    has exactly two dims that follow the input, apart: a spatial map `[B, C, h, w]` or
    `[B, h, w, C]`, the grid the tokens after it were flattened from."""
    found, seen, queue = [], {node}, deque([node])
    while queue and len(seen) <= limit and len(found) < most:
        n = queue.popleft()
        dims = probe.changed_dims(n)
        if dims is not None and len(dims) == 2 and _scaled_apart(probe, n, dims):
            found.append((n, (dims[0], dims[1])))
        if _reads_shape_only(n):  # `x.shape[-1] ** -0.5` is not where the data came from
            continue
        for parent in n.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return found


SHAPE_READS = {"size", "shape", "dim", "numel"}
# methods whose result takes only the shape, dtype and device of the tensor they are called on
FRESH_TENSORS = {"new_zeros", "new_ones", "new_empty", "new_full"}


def _reads_shape_only(node: Node) -> bool:
    """`x.size(...)`, `x.shape`, `getattr(x, 'shape')`, `x.new_zeros(...)`: the value of `x` does
    not flow through."""
    if node.op == "call_method" and (node.target in SHAPE_READS or node.target in FRESH_TENSORS):
        return True
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1
            and node.args[1] in SHAPE_READS)


def value_depends_on_input(node: Node) -> bool:
    """Whether the input's values (not only its shape) flow into `node`: False for a table
    expanded to the batch size (`pos.expand(x.shape[0], -1, -1)`)."""
    return depends_on_input(node, follow=lambda n: not _reads_shape_only(n))


def constant_value(gm: torch.fx.GraphModule, node: Node):
    """The value of a node that does not depend on the input's values (a buffer, a slice of a
    parameter), computed by running only its ancestors; None where it cannot be."""
    if value_depends_on_input(node):
        return None
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    if any(n.op == "placeholder" for n in needed):
        return None
    interp = torch.fx.Interpreter(gm)
    try:
        with torch.no_grad():
            for n in gm.graph.nodes:
                if n in needed:
                    interp.env[n] = interp.run_node(n)
    except Exception:  # noqa: BLE001 - not computable on its own
        return None
    return interp.env[node]


def runtime_sides(gm: torch.fx.GraphModule, grid: Node, dims: tuple[int, int], strides: tuple[int, int] = (1, 1)):
    """Graph nodes for `grid.size(i) // sh` and `grid.size(j) // sw`: the runtime grid a cure
    rebuilds its table or output size for (call inside `gm.graph.inserting_before(...)`)."""
    sides = []
    for d, s in zip(dims, strides):
        side = gm.graph.call_method("size", (grid, d))
        if strides != (1, 1):
            side = gm.graph.call_function(operator.floordiv, (side, s))
        sides.append(side)
    return tuple(sides)
