"""The input sizes an exported program really accepts, and narrowing the spec to them.

`torch.export` can specialise a size the model itself handles at any value: `nn.LSTM`'s
decomposition unrolls the loop over the sequence, so an LSTM over image rows fixes
`W // 4 == 24`. With `Dim.AUTO` (mixfx's fallback) or torch's own refined spec this happens
silently, and the file then fails, or in ONNX computes garbage, at the sizes mixfx's spec
promised. The program keeps what it assumed: its shape environment's guards and range
constraints over the input's symbols. Those are read here as predicates on the user's H and W,
intersected with the spec, and each dim re-fitted (`export_shapes._fit`): the narrower
constraint is reported in the user's terms and the verification sizes are drawn from it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import sympy
import torch

from mixfx.export_shapes import MIN_POINTS, WINDOWS, ExportShapes, SpatialDim, _fit

_EVAL_ENV = {"max": max, "min": min, "floor": math.floor, "ceil": math.ceil, "math": math, "torch": torch}


@dataclasses.dataclass
class ProgramGuard:
    """One relation the program assumed, over the spatial input dims (by the spec's names)."""

    text: str  # in the user's terms: "W//4 == 24"
    names: frozenset[str]
    holds: Callable[[dict[str, int]], bool]


def _printer():
    from torch.utils._sympy.printers import PythonPrinter

    return PythonPrinter()


def _input_dim_exprs(program, shapes: ExportShapes) -> dict[str, Any] | None:
    """The program's symbolic size of each dynamic spatial dim (`int` where it specialised
    it), keyed by the spec's dim name; None when the input placeholder is not found."""
    user_inputs = list(program.graph_signature.user_inputs)
    if not user_inputs:
        return None
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name == user_inputs[0]), None)
    val = None if node is None else node.meta.get("val")
    if val is None or not hasattr(val, "shape"):
        return None
    out: dict[str, Any] = {}
    for d in shapes.dims:
        if d.static:
            continue
        size = val.shape[d.axis]
        out[d.name] = size.node.expr if isinstance(size, torch.SymInt) else int(size)
    return out


def _solve_root(expr):
    """For a dim spelled `a*s + b` (a derived Dim): (s, a, b); None for anything else."""
    free = list(expr.free_symbols)
    if len(free) != 1:
        return None
    s = free[0]
    poly = sympy.Poly(expr, s) if expr.is_polynomial(s) else None
    if poly is None or poly.degree() != 1:
        return None
    a, b = poly.all_coeffs()
    if not (a.is_Integer and b.is_Integer) or int(a) <= 0:
        return None
    return s, int(a), int(b)


def _finite(bound) -> int | None:
    """A range bound as an int; None for torch's `int_oo` / sympy's infinities."""
    return int(bound) if isinstance(bound, (int, sympy.Integer)) else None


def program_guards(program, shapes: ExportShapes) -> tuple[list[ProgramGuard], dict[str, int]]:
    """The program's guards and range constraints as predicates on the spec's dim names, and
    the dims the program specialised to one value (name -> value)."""
    from torch.export.exported_program import _get_shape_env

    dims = _input_dim_exprs(program, shapes)
    if not dims:
        return [], {}
    specialised = {n: e for n, e in dims.items() if isinstance(e, int)}
    roots: dict[sympy.Symbol, tuple[str, int, int]] = {}  # s -> (dim name, a, b): size = a*s + b
    for name, expr in dims.items():
        if isinstance(expr, int):
            continue
        solved = _solve_root(expr)
        if solved is not None and solved[0] not in roots:
            roots[solved[0]] = (name, solved[1], solved[2])
    if not roots:
        return [], specialised

    def root_values(sizes: dict[str, int]) -> dict[sympy.Symbol, int] | None:
        vals = {}
        for s, (name, a, b) in roots.items():
            q, r = divmod(sizes[name] - b, a)
            if r:
                return None
            vals[s] = q
        return vals

    printer = _printer()
    plain = {s: sympy.Symbol(name, integer=True) for s, (name, a, b) in roots.items() if a == 1 and b == 0}
    guards: list[ProgramGuard] = []
    for s, (name, a, b) in roots.items():  # the range constraints: torch's min/max per symbol
        vr = program.range_constraints.get(s)
        if vr is None:
            continue
        lo, hi = _finite(vr.lower), _finite(vr.upper)

        def in_range(sizes, s=s, lo=lo, hi=hi):
            v = root_values(sizes)
            return v is not None and (lo is None or v[s] >= lo) and (hi is None or v[s] <= hi)

        text = " and ".join(p for p in ((f"{name} >= {a * lo + b}" if lo is not None else ""),
                                         (f"{name} <= {a * hi + b}" if hi is not None else "")) if p)
        guards.append(ProgramGuard(text or f"{name} >= 0", frozenset({name}), in_range))
    env = getattr(program.graph_module, "shape_env", None) or _get_shape_env(program.graph_module)
    seen: set = set()
    for g in getattr(env, "guards", []) or []:
        expr = g.expr
        if expr in seen or not expr.free_symbols or not expr.free_symbols <= set(roots):
            continue
        seen.add(expr)
        names = frozenset(roots[s][0] for s in expr.free_symbols)
        local = {s: sympy.Symbol(f"__r{i}", integer=True) for i, s in enumerate(sorted(roots, key=str))}
        try:
            code = compile(printer.doprint(expr.xreplace(local)), "<guard>", "eval")
            text = printer.doprint(expr.xreplace(plain)) if expr.free_symbols <= set(plain) else str(expr)
        except Exception:  # noqa: BLE001 - an expression the printer cannot write adds nothing
            continue
        by_name = {str(local[s]): s for s in local}

        def holds(sizes, code=code, by_name=by_name):
            v = root_values(sizes)
            if v is None:
                return False
            try:
                return bool(eval(code, _EVAL_ENV, {k: v[s] for k, s in by_name.items()}))  # noqa: S307
            except (ZeroDivisionError, ValueError, TypeError, NameError, OverflowError):
                return False

        guards.append(ProgramGuard(text, names, holds))
    return guards, specialised


def narrow_to_program(shapes: ExportShapes, program) -> tuple[ExportShapes, list[str]]:
    """`shapes` with each dynamic dim re-fitted to the sizes the program accepts (and notes
    saying what narrowed and why); `shapes` itself when the program accepts all it promises."""
    if shapes.static:
        return shapes, []
    try:
        guards, specialised = program_guards(program, shapes)
    except Exception as exc:  # noqa: BLE001 - torch internals moved: the verification still decides
        return shapes, [f"could not read the exported program's guards ({type(exc).__name__}); "
                        "the verification at other sizes decides"]
    example = {d.name: d.example for d in shapes.dims}
    guards = [g for g in guards if g.holds(example)]  # unreadable ones say nothing
    new_dims: list[SpatialDim] = []
    notes: list[str] = []
    assumed: list[str] = []  # the program's guards that narrowed a dim, for the constraints
    for d in shapes.dims:
        if d.static:
            new_dims.append(d)
            continue
        if d.name in specialised:
            new_dims.append(SpatialDim(d.name, d.axis, d.example, static=True,
                                       why=f"torch.export specialised {d.name} to {specialised[d.name]}"))
            notes.append(f"torch.export specialised {d.name} to {specialised[d.name]}: the file accepts "
                         f"only that {d.name}")
            continue
        mine = [g for g in guards if d.name in g.names]
        if not mine:
            new_dims.append(d)
            continue

        def program_ok(x: int, mine=mine, name=d.name) -> bool:
            sizes = {**example, name: x}
            return all(g.holds(sizes) for g in mine)

        n = WINDOWS[-1](d.example)
        rejected = next((x for x in range(1, n + 1) if d.accepts(x) and not program_ok(x)), None)
        if rejected is None:
            new_dims.append(d)
            continue
        culprit = next(g for g in mine if not g.holds({**example, d.name: rejected}))
        fit = None
        for k, window in enumerate(WINDOWS):
            size = window(d.example)
            accepted = [d.accepts(x) and program_ok(x) for x in range(1, size + 1)]
            fit = _fit(d.name, d.axis, d.example, accepted, bounded=k == len(WINDOWS) - 1)
            if fit is not None:
                break
        if fit is None or sum(1 for x in range(1, n + 1) if fit.accepts(x)) < MIN_POINTS:
            fit = SpatialDim(d.name, d.axis, d.example, static=True,
                             why=f"the exported program assumes {culprit.text}")
        else:
            fit.why = f"{fit.why} (the exported program assumes {culprit.text})"
        new_dims.append(fit)
        assumed.append(culprit.text)
        now = f"{fit.example} only" if fit.static else fit.formula().split(" = ", 1)[1]
        notes.append(f"torch.export specialised the program: it assumes {culprit.text}, so {d.name} "
                     f"is narrowed from {d.formula().split(' = ', 1)[1]} to {now}")
    if not notes:
        return shapes, []
    narrowed = dataclasses.replace(shapes, dims=new_dims, notes=list(shapes.notes))
    narrowed.constraints = list(shapes.constraints) + assumed
    for shape in narrowed.other_sizes():
        sizes = {d.name: shape[d.axis] for d in narrowed.dims}
        if not all(g.holds(sizes) for g in guards):
            notes.append(f"{'x'.join(map(str, shape[2:]))} fails a guard of the exported program relating "
                         "the dims; the verification there decides")
            break
    return narrowed, notes

