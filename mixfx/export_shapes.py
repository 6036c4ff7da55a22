"""The spatial dims torch.export should treat as dynamic, with the constraints they need.

`torch.export` wants each dynamic size spelled with its divisibility (`H = 16*Dim("h")`) and its
range, and it specialises any size that could be 0 or 1. The analysis's constraints describe the
sizes the *model* accepts; an export must also keep every intermediate size that varies with the
input at >= 2 and meet every guard torch's fake kernels raise. So the domain is re-derived here
from structured data rather than from display strings: the guards and size checks of a symbolic
run (sympy expressions, compiled to Python as `formulas.predicate` does) plus `size >= 2` for every varying
intermediate size, evaluated on a window of sizes per dim. The accepted sizes are then fitted
to `modulus*k + residue` with `k` in a range: a derived `Dim` torch.export understands.

A `fixed` model exports static; `ExportShapes.pinned_by` names the node that pins it.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import sympy
import torch
from torch import nn

from torch.utils._sympy.printers import PythonPrinter

from mixfx.formulas import free_input_symbols
from mixfx.report import AnalysisReport
from mixfx.shapes import flatten_outputs, propagate_symbolic

_PRINTER = PythonPrinter()  # the printer formulas.predicate compiles guards with
MIN_POINTS = 3  # a fitted dim must accept the example and at least two other sizes in the window
SYMBOLIC_BUDGET_S = 60.0


@dataclass
class SpatialDim:
    """One spatial input dim: accepted sizes are `modulus*k + residue` for `k_min <= k <= k_max`
    (`k_max` None: unbounded). `static` dims are exported at their example size."""

    name: str  # "H", "W" (the analysis's names)
    axis: int  # position in the input tensor
    example: int
    modulus: int = 1
    residue: int = 0
    k_min: int = 0
    k_max: int | None = None
    static: bool = False
    why: str = ""  # what set the modulus and range, in the user's terms

    @property
    def min_size(self) -> int:
        return self.modulus * self.k_min + self.residue

    @property
    def max_size(self) -> int | None:
        return None if self.k_max is None else self.modulus * self.k_max + self.residue

    def accepts(self, size: int) -> bool:
        if self.static:
            return size == self.example
        k, rem = divmod(size - self.residue, self.modulus)
        return rem == 0 and k >= self.k_min and (self.k_max is None or k <= self.k_max)

    def nearest(self, target: float, avoid: set[int] = frozenset()) -> int:
        """The accepted size nearest `target`, not in `avoid` (the example size if static)."""
        if self.static:
            return self.example
        k = max(self.k_min, round((target - self.residue) / self.modulus))
        if self.k_max is not None:  # a bounded range: the target may lie beyond it
            k = min(k, self.k_max)
        candidates = sorted({max(self.k_min, k + d) for d in range(-4, 5)}, key=lambda j: abs(
            self.modulus * j + self.residue - target))
        for j in candidates:
            size = self.modulus * j + self.residue
            if self.accepts(size) and size not in avoid:
                return size
        return self.example

    def formula(self) -> str:
        """What torch.export is given, spelled as in torch: `H = 16*Dim("h", min=2)`."""
        if self.static:
            return f"{self.name} = {self.example} (static)"
        derived = self.modulus > 1 or self.residue
        rng = f"min={self.k_min}" + ("" if self.k_max is None else f", max={self.k_max}")
        rhs = f'Dim("{self.name.lower() if derived else self.name}", {rng})'
        if self.modulus > 1:
            rhs = f"{self.modulus}*{rhs}"
        if self.residue:
            rhs += f" + {self.residue}"
        return f"{self.name} = {rhs}"

    def torch_dim(self) -> Any:
        """`int` (static), `Dim` or a derived `modulus*Dim + residue`."""
        from torch.export import Dim

        if self.static:
            return None
        root_name = self.name.lower() if self.modulus > 1 or self.residue else self.name
        kwargs = {"min": self.k_min}
        if self.k_max is not None:
            kwargs["max"] = self.k_max
        root = Dim(root_name, **kwargs)
        if self.modulus == 1 and self.residue == 0:
            return root
        return self.modulus * root + self.residue if self.residue else self.modulus * root


@dataclass
class Pin:
    """The node that makes a model `fixed` (from the analysis)."""

    node: str
    module: str | None
    reason: str
    cure: str | None = None

    def describe(self) -> str:
        where = f"`{self.module}` (node {self.node})" if self.module else f"node `{self.node}`"
        return f"{where}: {self.reason}"


@dataclass
class ExportShapes:
    """What to tell torch.export about the input: which dims are dynamic and how."""

    arg_name: str  # forward's parameter the spec is keyed by
    input_shape: list[int]
    classification: str
    dims: list[SpatialDim] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)  # the analysis's, for display
    pinned_by: Pin | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> bool:
        return all(d.static for d in self.dims)

    def to_torch(self) -> dict[str, Any]:
        """The `dynamic_shapes` argument of torch.export.export / torch.onnx.export."""
        if self.static:
            return {self.arg_name: None}
        return {self.arg_name: {d.axis: d.torch_dim() for d in self.dims if not d.static}}

    def other_sizes(self) -> list[tuple[int, ...]]:
        """Two input shapes besides the example that meet every constraint, H != W, near
        1.25x/0.875x and 0.75x/1.125x of the example (none when static)."""
        if self.static:
            return []
        out: list[tuple[int, ...]] = []
        for factors in ((1.25, 0.875, 1.125), (0.75, 1.125, 0.875)):
            shape = list(self.input_shape)
            chosen: list[int] = []
            for i, d in enumerate(self.dims):
                target = d.example * factors[i % len(factors)]
                size = d.nearest(target, avoid={d.example, *chosen})
                if d.static or size == d.example:
                    size = d.nearest(target, avoid=set(chosen))
                chosen.append(size)
                shape[d.axis] = size
            if tuple(shape) != tuple(self.input_shape) and tuple(shape) not in out:
                out.append(tuple(shape))
        return out

    def describe(self) -> list[str]:
        return [d.formula() for d in self.dims]

    def to_dict(self) -> dict:
        return {
            "input": self.arg_name,
            "input_shape": list(self.input_shape),
            "classification": self.classification,
            "static": self.static,
            "dims": [{"name": d.name, "axis": d.axis, "formula": d.formula(), "modulus": d.modulus,
                      "residue": d.residue, "min": None if d.static else d.min_size,
                      "max": d.max_size if not d.static else None, "static": d.static, "why": d.why}
                     for d in self.dims],
            "constraints": list(self.constraints),
            "pinned_by": None if self.pinned_by is None else {
                "node": self.pinned_by.node, "module": self.pinned_by.module,
                "reason": self.pinned_by.reason, "cure": self.pinned_by.cure},
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- derivation
def forward_arg_name(model: nn.Module) -> str:
    """The name of forward's first parameter (torch.export keys `dynamic_shapes` by it)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return "x"
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return p.name
    return params[0].name if params else "x"


def _requirements(run, symbols: Mapping[str, sympy.Symbol], notes: list[str] | None = None) -> list:
    """Every relation on the input sizes the export must keep true: the guards and size checks
    of the symbolic run (but `!=`), and `size >= 2` for each intermediate size that varies with the input
    and is >= 2 at the example (torch.export specialises sizes 0 and 1; a size that *is* 1 at
    the example stays 1, which pins a range)."""
    # keyed by the sympy expressions themselves (structural hash): keying by str() printed
    # every size of every node, 31 of HaloNet's 62 s here
    exprs: dict[Any, Any] = {}
    for guards in run.guards.values():
        for g in guards:
            # `!=` guards are branch decisions taken at the example (a no-op view, the token
            # count of the pretrained grid): they exclude single sizes, never a range
            if free_input_symbols(g, symbols) and not isinstance(g, sympy.Ne):
                exprs.setdefault(g, g)
    for cond in run.asserts.values():
        if cond is not None and not isinstance(cond, bool) and free_input_symbols(cond, symbols):
            exprs.setdefault(cond, cond)
    allowed = set(symbols.values())
    where: dict[Any, str] = {}  # each varying size -> the first node that has it
    for node, value in run.values.items():
        for t in flatten_outputs(value):
            for d in t.shape:
                expr = d.node.expr if isinstance(d, torch.SymInt) else None
                if expr is None or not getattr(expr, "free_symbols", None):
                    continue
                if not expr.free_symbols <= allowed:
                    continue
                where.setdefault(expr, node)
    known = getattr(run.shape_env, "backed_var_to_val", None) or run.shape_env.var_to_val
    example = {name: int(known[sym]) for name, sym in symbols.items() if sym in known}
    for expr in where:
        at_example = _value(expr, symbols, example)
        if at_example is None:
            continue
        # unevaluated: sympy's automatic simplification of windowed models' sizes takes seconds
        rel = sympy.Ge(expr, 2, evaluate=False) if at_example >= 2 else sympy.Eq(expr, at_example, evaluate=False)
        if at_example < 2 and notes is not None and not any("which torch.export specialises" in n.replace("\n", " ") for n in notes):
            notes.append(f"`{where[expr]}` has a size of {at_example} at the example input, which torch.export specialises: "
                         "the export only accepts sizes that keep it there; export at a larger --input "
                         "for a wider range")
        exprs.setdefault(rel, rel)
    return list(exprs.values())


_ENV = {"max": max, "min": min, "floor": math.floor, "ceil": math.ceil, "math": math}


def _compile(expr, symbols: Mapping[str, sympy.Symbol]):
    """A guard or size expression as compiled Python over `__H`, `__W`: the route
    `formulas.predicate` takes, with `math` in scope (torch prints `math.ceil(...)` in some
    guards, mobilevit's, which `formulas.predicate` reads as False)."""
    src = _PRINTER.doprint(expr)
    for name, sym in sorted(symbols.items(), key=lambda kv: -len(str(kv[1]))):
        src = src.replace(str(sym), f"__{name}")
    return compile(src, "<size>", "eval")


def _value(expr, symbols: Mapping[str, sympy.Symbol], sizes: Mapping[str, int]) -> int | None:
    """A size expression's value at `sizes` (sympy substitution is slow on long floor-division
    chains)."""
    try:
        return int(eval(_compile(expr, symbols), _ENV, {f"__{n}": v for n, v in sizes.items()}))  # noqa: S307
    except Exception:  # noqa: BLE001 - an expression we cannot evaluate adds no requirement
        return None


def _predicate(expr, symbols: Mapping[str, sympy.Symbol]) -> Callable[..., bool]:
    code = _compile(expr, symbols)

    def holds(**sizes: int) -> bool:
        try:
            return bool(eval(code, _ENV, {f"__{n}": v for n, v in sizes.items()}))  # noqa: S307
        except (ZeroDivisionError, ValueError, TypeError, NameError, OverflowError):
            return False

    return holds


WINDOWS = (lambda e: e + 192, lambda e: max(3 * e, e + 192))  # the wider one for long periods (HaloNet: 256)


def _fit(name: str, axis: int, example: int, accepted: list[bool], *, bounded: bool = True) -> SpatialDim | None:
    """The smallest modulus whose residue class through the example has a run of at least
    MIN_POINTS accepted sizes containing it and reaching the window's end (unbounded); with
    `bounded`, failing that, the smallest with a bounded run. The run's ends give the range.
    `accepted[x - 1]` says whether size x is accepted; None: no fit."""
    n = len(accepted)
    if not accepted[example - 1]:
        return SpatialDim(name, axis, example, static=True,
                          why=f"the example size {example} does not meet the model's own guards")
    for passes in ((False, True) if bounded else (False,)):
        fit = _fit_pass(name, axis, example, accepted, allow_bounded=passes)
        if fit is not None:
            return fit
    return None


def fit_dim(name: str, axis: int, example: int, ok: Callable[[int], bool]) -> SpatialDim | None:
    """`_fit` over the sizes `ok` accepts, in the narrow window first, then the wide one. An
    unbounded fit from the narrow window must hold over the wide one too: a few accepted
    members that happen to reach the narrow window's end are not a period (MobileViT's sizes,
    57..64 mod 64, fit `62*k + 8` up to 448 and fail at 504)."""
    widest = WINDOWS[-1](example)
    for k, window in enumerate(WINDOWS):
        last = k == len(WINDOWS) - 1
        fit = _fit(name, axis, example, [ok(x) for x in range(1, window(example) + 1)], bounded=last)
        if fit is None:
            continue
        if not last and not fit.static and fit.k_max is None and not all(
                ok(x) for x in range(example, widest + 1, fit.modulus)):
            continue
        return fit
    return None


def _fit_pass(name: str, axis: int, example: int, accepted: list[bool], *, allow_bounded: bool) -> SpatialDim | None:
    n = len(accepted)
    for m in range(1, n // MIN_POINTS + 1):
        r = example % m
        members = list(range(r if r else m, n + 1, m))
        i = members.index(example)
        lo = i
        while lo > 0 and accepted[members[lo - 1] - 1] and members[lo - 1] >= 2:
            lo -= 1
        hi = i
        while hi + 1 < len(members) and accepted[members[hi + 1] - 1]:
            hi += 1
        if hi - lo + 1 < MIN_POINTS or (not allow_bounded and hi != len(members) - 1):
            continue
        k_min = (members[lo] - r) // m
        k_max = None if hi == len(members) - 1 else (members[hi] - r) // m
        d = SpatialDim(name, axis, example, m, r, k_min, k_max)
        parts = []
        if m > 1:
            parts.append(f"{name} % {m} == {r}")
        parts.append(f"{name} >= {d.min_size}")
        if k_max is not None:
            parts.append(f"{name} <= {d.max_size}")
        d.why = ", ".join(parts)
        return d
    return None


def derive_export_shapes(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    report: AnalysisReport | None = None,
    traced: Any = None,
    leaves=(),
) -> ExportShapes:
    """The dynamic-shape spec for exporting `model` at `example_input` (see module docstring).
    Pass `report`/`traced` when already computed to skip re-analysing."""
    from mixfx.analysis import analyze
    from mixfx.tracing import trace

    shape = tuple(example_input.shape)
    if traced is None:
        traced = trace(model, example_input, leaves=leaves)
    if report is None:
        report = analyze(traced, example_input)
    spec = ExportShapes(forward_arg_name(model), list(shape), report.classification,
                        constraints=list(report.constraints))
    if report.classification == "fixed":
        first = next((r for r in report.rigid_nodes if r.kind == "structural"), report.rigid_nodes[0])
        spec.pinned_by = Pin(first.node, first.module, first.reason, first.cure)
        names = _dim_names(len(shape))
        spec.dims = [SpatialDim(n, 2 + i, shape[2 + i], static=True, why="pinned") for i, n in enumerate(names)]
        spec.notes.append(f"fixed-resolution model: exported static at {'x'.join(map(str, shape))}; "
                          f"pinned by {spec.pinned_by.describe()}")
        return spec
    run = propagate_symbolic(traced.graph_module, shape, budget_s=SYMBOLIC_BUDGET_S)
    if run.failure is not None:
        spec.notes.append(f"symbolic run stopped at `{run.failure.node}` ({run.failure.kind}): the constraints "
                          "after it are left to torch.export")
    symbols = run.symbols
    preds: list[tuple[Callable[..., bool], set[str]]] = [
        (_predicate(e, symbols), free_input_symbols(e, symbols)) for e in _requirements(run, symbols, spec.notes)]
    from mixfx.analysis.index_bounds import upper_bounds

    for name, largest in upper_bounds(report.constraints).items():  # invisible to the symbolic run
        if name in symbols:
            preds.append((lambda name=name, largest=largest, **sizes: sizes[name] <= largest, {name}))
    example = {name: shape[2 + i] for i, name in enumerate(symbols)}
    # every recorded guard holds at the example by construction: one that reads False there is
    # one the printed-Python route cannot evaluate (mobilevit's), and says nothing
    unreadable = [p for p, _ in preds if not p(**example)]
    if unreadable:
        preds = [(p, used) for p, used in preds if p(**example)]
        spec.notes.append(f"{len(unreadable)} guard(s) could not be evaluated and were left to torch.export")
    for i, name in enumerate(symbols):
        mine = [p for p, used in preds if name in used]
        memo: dict[int, bool] = {}

        def ok(x: int) -> bool:
            if x not in memo:
                memo[x] = all(p(**{**example, name: x}) for p in mine)
            return memo[x]

        fit = fit_dim(name, 2 + i, example[name], ok)
        spec.dims.append(fit or SpatialDim(name, 2 + i, example[name], static=True,
                                           why=f"no regular set of sizes around {example[name]} meets the guards"))
    if not spec.static:
        _check_jointly(spec, preds)
    return spec


def _check_jointly(spec: ExportShapes, preds) -> None:
    """The dims are fitted one at a time; a relation between them (H == W, H*W bounds) shows at
    the other sizes. Such a dim pair is noted; torch.export then decides."""
    for shape in spec.other_sizes():
        sizes = {d.name: shape[d.axis] for d in spec.dims}
        failing = [p for p, _ in preds if not p(**sizes)]
        if failing:
            spec.notes.append(f"the dims were fitted one at a time and {'x'.join(map(str, shape))} fails a guard "
                              "relating them; torch.export may refuse the spec")
            return


def _dim_names(rank: int) -> list[str]:
    from mixfx.shapes import spatial_symbol_names

    return spatial_symbol_names(rank)


def dynamic_shapes(model: nn.Module, example_input: torch.Tensor, *, leaves=()) -> dict[str, Any]:
    """`dynamic_shapes` for `torch.export.export(model, (example_input,), dynamic_shapes=...)`:
    `{arg: {2: 16*Dim("h", min=2), 3: ...}}` from the analysis's constraints. A `fixed` model
    gets `{arg: None}` (static) and a warning naming the node that pins it."""
    spec = derive_export_shapes(model, example_input, leaves=leaves)
    if spec.pinned_by is not None:
        warnings.warn(f"mixfx: {spec.notes[0]}. `mixfx.rewrite(model, to='polymorphic')` may cure it"
                      + (f"; {spec.pinned_by.cure}" if spec.pinned_by.cure else "."), stacklevel=2)
    return spec.to_torch()
