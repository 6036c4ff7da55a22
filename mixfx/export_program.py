"""What an exported program itself accepts, and making it serialisable.

torch.export may accept fewer sizes than the model does: it specialises a branch taken at the
example (a crop that is a no-op there, a pad of 0) into a guard on the input sizes, which the
loaded `.pt2` checks at run time ("Guard failed: 2 + 2*((W-1)//32) == 1 + (W-1)//16"). The
verification must use sizes the *program* accepts, and the user must be told the narrower
domain. The program's own input checks (its range constraints and derived dims, then its guard
function) are run on `meta` tensors here: no compute, a millisecond per size.

`torch.export.save` cannot serialise `math.ceil`/`math.floor` of sizes (MobileViT's
`math.ceil(h / 2)` patch count); they are rewritten into the integer ops it can serialise.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Callable, Sequence

import torch

from mixfx.export_shapes import ExportShapes, SpatialDim, fit_dim

Acceptance = Callable[[Sequence[int]], bool]


# ----------------------------------------------------------------------------- accepted sizes
def program_acceptance(program: torch.export.ExportedProgram) -> Acceptance | None:
    """A predicate `accepts(shape)`: whether the exported program's own input checks pass for
    an input of that shape (None when this torch does not expose them)."""
    try:
        from torch.export._unlift import _check_input_constraints_for_module

        module = program.module()
    except Exception:  # noqa: BLE001 - private torch API moved: no check, the verification decides
        return None
    guards = getattr(module, "_guards_fn", None)

    def accepts(shape: Sequence[int]) -> bool:
        x = torch.empty(tuple(shape), device="meta")
        try:
            _check_input_constraints_for_module(module, (x,), {})
            if guards is not None:
                guards(x)
        except (AssertionError, RuntimeError, ValueError, ZeroDivisionError):
            return False
        return True

    return accepts


def fit_to_program(shapes: ExportShapes, accepts: Acceptance) -> ExportShapes:
    """`shapes` narrowed to the sizes the exported program accepts: each dynamic dim is refitted
    (same `modulus*k + residue` form, the other dims at the example) to the sizes both the
    analysis and the program accept. Returns `shapes` itself when the program accepts them all
    within the fitting window, else a copy with the narrowed dims and a note saying so."""
    if shapes.static:
        return shapes
    example = list(shapes.input_shape)
    dims: list[SpatialDim] = []
    for d in shapes.dims:
        if d.static:
            dims.append(d)
            continue
        memo: dict[int, bool] = {}

        def ok(size: int, d: SpatialDim = d) -> bool:
            if size not in memo:
                shape = list(example)
                shape[d.axis] = size
                memo[size] = d.accepts(size) and accepts(shape)
            return memo[size]

        fit = fit_dim(d.name, d.axis, d.example, ok)
        if fit is None or fit.static:
            fit = SpatialDim(d.name, d.axis, d.example, static=True,
                             why="the exported program accepts no regular set of sizes around the example")
        if not fit.static:
            fit.why += " (what the exported program accepts)"
        same = (fit.modulus, fit.residue, fit.min_size, fit.max_size) == (d.modulus, d.residue, d.min_size, d.max_size)
        dims.append(d if same else fit)
    if all(a is b for a, b in zip(dims, shapes.dims)):
        return shapes
    narrowed = dataclasses.replace(shapes, dims=dims, notes=list(shapes.notes))
    narrowed.notes.append(
        "torch.export specialised the program to fewer sizes than the analysis found (it guards "
        "what it cannot prove for every size, e.g. a branch taken at the example); the file "
        "accepts only " + "; ".join(narrowed.describe())
        + " (the analysis found " + "; ".join(shapes.describe()) + ")")
    return narrowed


def accepted_other_sizes(shapes: ExportShapes, accepts: Acceptance) -> list[tuple[int, ...]]:
    """`shapes.other_sizes()`, each replaced by the nearest shape the program accepts jointly
    when a relation between the dims rules it out (dropped when none is near)."""
    out: list[tuple[int, ...]] = []
    example = tuple(shapes.input_shape)
    for shape in shapes.other_sizes():
        if accepts(shape):
            chosen = shape
        else:
            chosen = _nearest_joint(shapes, shape, accepts, avoid={example, *out})
        if chosen is not None and chosen not in out and chosen != example:
            out.append(chosen)
    return out


def _nearest_joint(shapes: ExportShapes, target: tuple[int, ...], accepts: Acceptance, avoid) -> tuple[int, ...] | None:
    options = []
    for d in shapes.dims:
        sizes: list[int] = []
        for _ in range(6):
            s = d.nearest(target[d.axis], avoid=set(sizes))
            if s in sizes:
                break
            sizes.append(s)
        options.append(sizes)
    candidates = []
    for combo in _product(options):
        shape = list(target)
        for d, s in zip(shapes.dims, combo):
            shape[d.axis] = s
        cost = sum(abs(s - target[d.axis]) for d, s in zip(shapes.dims, combo))
        candidates.append((cost, tuple(shape)))
    for _, shape in sorted(candidates):
        if shape not in avoid and accepts(shape):
            return shape
    return None


def _product(options: list[list[int]]):
    if not options:
        yield ()
        return
    for head in options[0]:
        for rest in _product(options[1:]):
            yield (head, *rest)


# ----------------------------------------------------------------------------- serialisation
_ROUNDINGS = {math.ceil: "ceil", math.floor: "floor"}


def make_serialisable(program: torch.export.ExportedProgram) -> int:
    """Rewrite `math.ceil`/`math.floor` of sizes in `program`'s graph (which
    `torch.export.save` cannot serialise) into integer ops it can: `ceil(a / b)` ->
    `-((-a) // b)`, `floor(a / b)` -> `a // b` for integer `a`, `b`; of any other value `x`,
    `trunc(x)` corrected by one where it rounded the wrong way. Returns how many were
    rewritten; the program is changed in place."""
    graph = program.graph_module.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ROUNDINGS or len(node.args) != 1:
            continue
        kind = _ROUNDINGS[node.target]
        arg = node.args[0]
        with graph.inserting_before(node):
            if (isinstance(arg, torch.fx.Node) and arg.target is operator.truediv
                    and all(_is_integer(a) for a in arg.args)):
                a, b = arg.args
                if kind == "floor":
                    new = _sym_call(graph, operator.floordiv, a, b)
                else:
                    new = _sym_call(graph, operator.neg, _sym_call(graph, operator.floordiv,
                                                                   _sym_call(graph, operator.neg, a), b))
            else:
                trunc = _sym_call(graph, math.trunc, arg)
                compare = operator.gt if kind == "ceil" else operator.lt
                off = _sym_call(graph, torch.sym_ite, _sym_call(graph, compare, arg, trunc), 1, 0)
                new = _sym_call(graph, operator.add if kind == "ceil" else operator.sub, trunc, off)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    if count:
        graph.eliminate_dead_code()
        program.graph_module.recompile()
    return count


def _is_integer(value) -> bool:
    if isinstance(value, torch.fx.Node):
        value = value.meta.get("val")
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _sym_call(graph: torch.fx.Graph, target, *args) -> torch.fx.Node:
    """A call node whose `meta['val']` is computed from its arguments' (the serialiser reads it)."""
    node = graph.call_function(target, args)
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in args]
    node.meta["val"] = target(*vals)
    return node
