"""Shape propagation over an fx graph: one symbolic run, and cheap concrete runs.

- `propagate_symbolic` runs the graph on fake tensors whose spatial dims are ShapeEnv symbols
  (FakeTensorMode + ShapeEnv, `DimDynamic.DYNAMIC` per dim so that H and W stay distinct and are
  not 0/1-specialised). Every guard the ShapeEnv records is attributed to the node that created it;
  explicit checks (`torch._assert`, timm's `_assert`, export's `_guards_fn`) are recorded but not
  enforced, so that propagation continues past a size check to the structural cause behind it.
- `propagate_concrete` runs the graph on meta tensors at one concrete input size (weights swapped
  for meta copies: no compute, no weight memory) and records per-node shapes, the failing node,
  and which explicit checks would have failed. It is ~10x cheaper than the symbolic run.

Both compute the hottest ops directly (`shape_rules`: BatchNorm, activations, Linear, LayerNorm,
convolutions, cat) and memoise repeated calls (`shape_memo`): together they make a symbolic
ResNet-50 run ~3x and a ViT run ~2x cheaper.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch._guards import SLoc
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from mixfx.shape_memo import ShapeMemo, Unkeyable, is_torch_target, module_key, value_key
from mixfx.shape_rules import NOT_HANDLED, SHAPE_PRESERVING_MODULES, TENSOR_LIKE, ShapeRules, materialise
from mixfx.tracing import is_assert_target

def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor (or `ShapeOnly`) in a (nested) tuple/list/dict output, in order."""
    if isinstance(value, TENSOR_LIKE):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_outputs(v)]
    if hasattr(value, "__dataclass_fields__") or hasattr(value, "_fields"):
        items = value._asdict().values() if hasattr(value, "_asdict") else vars(value).values()
        return [t for v in items for t in flatten_outputs(v)]
    return []


def spatial_symbol_names(rank: int) -> list[str]:
    """User-facing names of the input dims after (batch, channels)."""
    return {3: ["L"], 4: ["H", "W"], 5: ["D", "H", "W"]}.get(rank, [f"S{i}" for i in range(rank - 2)])


@dataclass
class NodeFailure:
    node: str
    error: str
    kind: str  # "shape" (a real size mismatch), "data_dependent", "unsupported", "error"


@dataclass
class SymbolicRun:
    """Result of one symbolic propagation. Values are fake tensors with SymInt sizes."""

    shape_env: ShapeEnv
    symbols: dict[str, Any]  # user name ("H") -> sympy symbol
    values: dict[str, Any] = field(default_factory=dict)  # node name -> fake value
    guards: dict[str, list[Any]] = field(default_factory=dict)  # node name -> new guard exprs
    asserts: dict[str, Any] = field(default_factory=dict)  # node name -> sympy condition (not enforced)
    failure: NodeFailure | None = None


@dataclass
class ConcreteRun:
    """Result of one meta-tensor propagation at a concrete input shape."""

    input_shape: tuple[int, ...]
    shapes: dict[str, Any] = field(default_factory=dict)  # node name -> shape tuple (or nested list)
    failed_asserts: list[str] = field(default_factory=list)
    failure: NodeFailure | None = None
    notes: list[str] = field(default_factory=list)
    probe_failures: dict[str, str] = field(default_factory=dict)  # node -> error of its value probe
    sizes: dict[str, int] = field(default_factory=dict)  # node -> the int it computed (x.size(0), h // 7)

    @property
    def ok(self) -> bool:
        return self.failure is None


def classify_exception(exc: BaseException) -> str:
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, UnsupportedOperatorException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    text = str(exc).lower()
    if isinstance(exc, GuardOnDataDependentSymNode) or "data-dependent" in text or "data dependent" in text \
            or ".item()" in text:
        return "data_dependent"
    if "meta tensor" in text or "on meta" in text or "'meta'" in text or "device meta" in text:
        return "unsupported"
    if "no fake impl" in text or "register_fake" in text or "abstract impl" in text:  # custom op without a shape rule
        return "unsupported"
    if isinstance(exc, (DynamicOutputShapeException,)):
        return "data_dependent"
    if isinstance(exc, (UnsupportedOperatorException, NotImplementedError)):
        return "unsupported"
    if isinstance(exc, (RuntimeError, ValueError, IndexError, AssertionError)):
        return "shape"
    return "error"


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {line}"[:400]


class _PropagationInterpreter(torch.fx.Interpreter):
    """Interpreter that skips explicit checks, computes hot ops with `ShapeRules` and memoises
    repeated calls (`ShapeMemo`). Both are off for runs on real tensors, whose values matter."""

    def __init__(self, gm: torch.fx.GraphModule, *, fast: bool = True):
        super().__init__(gm, garbage_collect_values=True)
        self.current: torch.fx.Node | None = None
        self.skipped_asserts: dict[str, Any] = {}
        self.rules = ShapeRules(lazy=True) if fast else None
        self.memo = ShapeMemo(gm) if fast else None
        # inside leaf modules and opaque functions, the rules apply per torch call
        self.shortcuts = _FunctionShortcuts() if fast else None

    def is_check(self, n: torch.fx.Node) -> bool:
        if n.op == "call_function":
            return is_assert_target(n.target)
        if n.op == "call_module":
            return str(n.target) == "_guards_fn"  # torch.export's input-guard check
        return False

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        if self.is_check(n):
            if n.op == "call_function":
                args, _ = self.fetch_args_kwargs_from_env(n)
                self.skipped_asserts[n.name] = args[0] if args else None
            return None
        if self.rules is None or n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op == "call_module":
                out = self.rules.module(self.fetch_attr(str(n.target)), args, kwargs)
            elif n.op == "call_function":
                out = self.rules.function(n.target, args, kwargs)
            else:
                out = self.rules.method(str(n.target), args, kwargs)
            if out is not NOT_HANDLED:
                return out
            args, kwargs = materialise(args), materialise(kwargs)
            key = self.memo.key(n, args, kwargs)
            out = self.memo.get(key)
            if out is None:
                with self.shortcuts:
                    out = getattr(self, n.op)(n.target, args, kwargs)
                self.memo.put(key, out)
            return out


def _meta_state(gm: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Meta stand-ins for every parameter and buffer; None when they are all meta already."""
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    if all(v.is_meta for _, v in tensors):
        return None
    return {k: (v if v.is_meta else torch.empty_like(v, device="meta")) for k, v in tensors}


@contextlib.contextmanager
def meta_weights(gm: torch.nn.Module) -> Iterator[None]:
    """Temporarily swap every parameter and buffer for a meta tensor of the same shape."""
    from torch.nn.utils.stateless import _reparametrize_module

    state = _meta_state(gm)
    if state is None:  # built on the meta device: nothing to swap
        yield
        return
    with _reparametrize_module(gm, state, tie_weights=True, strict=False):
        yield


@contextlib.contextmanager
def shortcut_forwards(model: nn.Module, *, share_outputs: bool = True) -> Iterator[None]:
    """Give the eager model the interpreter's shortcuts, for a cheap eager run on meta tensors:
    modules `ShapeRules` knows get their shape from it, other built-in leaf modules reuse the
    output of an earlier call with the same configuration and input shape. Installed as instance
    attributes, removed on exit. `share_outputs=False`: every call gets its own output tensor (no
    memo, no shared empties), for callers that tell tensors apart by identity."""
    rules = ShapeRules(share_outputs=share_outputs)
    memo: dict[Any, Any] = {}
    patched: list[nn.Module] = []

    def shortcut(mod: nn.Module, config: Any):
        original = mod.forward

        def forward(*args, **kwargs):
            out = rules.module(mod, args, kwargs)
            if out is not NOT_HANDLED:
                return out
            try:
                key = None if config is None else (config, value_key(args), value_key(kwargs))
            except Unkeyable:
                key = None
            if key is None or not share_outputs:
                return original(*args, **kwargs)
            if key not in memo:
                memo[key] = original(*args, **kwargs)
            return memo[key]
        return forward

    for mod in model.modules():
        if "forward" in vars(mod):
            continue  # already patched by someone: leave it alone
        config = _leaf_config(mod)
        if config is None and not isinstance(mod, SHAPE_PRESERVING_MODULES):
            continue
        mod.forward = shortcut(mod, config)
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


_LEAF_CONFIGS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _leaf_config(mod: nn.Module) -> Any:
    """`module_key` of a leaf module, computed once per module (a model is run at many sizes)."""
    try:
        return _LEAF_CONFIGS[mod]
    except KeyError:
        pass
    config = module_key(mod) if next(mod.children(), None) is None else None
    try:
        _LEAF_CONFIGS[mod] = config
    except TypeError:
        pass
    return config


def eager_meta_forward(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Any:
    """The eager model's output on a meta input of `input_shape`, with meta weights and the
    shape shortcuts: no compute, no weight copies, milliseconds even for large models. Indices
    computed from sizes are checked against what they index, as the eager forward does
    (`mixfx.analysis.index_bounds`). Raises whatever the model raises (its own size checks, or
    ops that cannot run on meta tensors: `classify_exception` tells which)."""
    from mixfx.analysis.index_bounds import IndexValues  # meta tensors do not check index bounds: this does

    x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    with meta_weights(model), shortcut_forwards(model), _FunctionShortcuts(), IndexValues(input_shape), \
            torch.no_grad():
        return model(x)


class _FunctionShortcuts(TorchFunctionMode):
    """The function and method rules of `ShapeRules` for an eager forward (where the interpreter
    cannot step in): every torch function and Tensor method call a rule handles gets its output
    from the rule."""

    def __init__(self, share_outputs: bool = True) -> None:
        super().__init__()
        self.rules = ShapeRules(share_outputs=share_outputs)
        self.enabled = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Every op computes in this block (a value probe needs real values)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        out = self.rules.function(func, args, kwargs)
        if out is NOT_HANDLED:
            name = getattr(func, "__name__", None)
            if name and getattr(torch.Tensor, name, None) is func:
                out = self.rules.method(name, args, kwargs)
        return func(*args, **kwargs) if out is NOT_HANDLED else out


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return torch.empty_like(value, device="meta")
    return value


VALUE_PROBE_LIMIT = 1 << 22  # elements over all tensor arguments of one probed call


class _MetaInterpreter(_PropagationInterpreter):
    """Meta tensors carry no values, so an opaque helper that computes indices from the input
    size (timm's MViTv2 `cal_rel_pos_type` indexes a fixed-size position table) runs fine on meta
    at any size. Each such call (a function outside torch, e.g. one of timm's autowrapped ones)
    is therefore also run once on real zero tensors of the same shapes ("value probe"); its
    failures are recorded, and a caller compares them with the example size's."""

    def __init__(self, gm: torch.fx.GraphModule, *, fast: bool = True, probe_values: bool = False):
        super().__init__(gm, fast=fast)
        self.probe_values = probe_values
        self.probe_failures: dict[str, str] = {}

    def get_attr(self, target, args, kwargs):  # plain tensor attributes that are not buffers
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if self.probe_values and not is_torch_target(target) and not is_assert_target(target):
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if tensors and sum(t.numel() for t in tensors) <= VALUE_PROBE_LIMIT:
                real_args, real_kwargs = torch.utils._pytree.tree_map(_zeros_for_meta, (args, kwargs))
                try:
                    with self.shortcuts.paused() if self.shortcuts else contextlib.nullcontext():
                        target(*real_args, **real_kwargs)  # real values: every op computes
                except Exception as exc:  # noqa: BLE001 - a finding, compared with the example's
                    self.probe_failures[self.current.name] = _short(exc)
        return out


def _zeros_for_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_meta:
        return torch.zeros(value.shape, dtype=value.dtype)
    return value


def _shape_of(value: Any) -> Any:
    if isinstance(value, TENSOR_LIKE):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape_of(v) for v in value]
    if isinstance(value, dict):
        return {k: _shape_of(v) for k, v in value.items()}
    return None


def propagate_concrete(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], *, allow_real: bool = True,
                       example_probe_failures: dict[str, str] | None = None,
                       probe_values: bool = True) -> ConcreteRun:
    """Run `gm` on a meta tensor of `input_shape`; never raises for failures inside the graph.

    Where a node cannot run on meta tensors (data-dependent control flow in a leaf module, an op
    without a meta kernel) and the model has real weights, the run is repeated on a real random
    input (real compute, so only as a fallback).

    Opaque helper functions are value-probed (see `_MetaInterpreter`). Given the probe failures
    at the example size, a probe that fails here but not there is this run's failure."""
    run = _propagate(gm, input_shape, real=False, probe_values=probe_values)
    if example_probe_failures is not None and run.failure is None:
        new = [name for name in run.probe_failures if name not in example_probe_failures]
        if new:
            run.failure = NodeFailure(new[0], run.probe_failures[new[0]] + " (on real zeros of the same shapes)",
                                      "shape")
    if (allow_real and run.failure is not None and run.failure.kind in ("data_dependent", "unsupported")
            and not any(t.is_meta for t in [*gm.parameters(), *gm.buffers()])):
        real = _propagate(gm, input_shape, real=True)
        real.notes = [f"`{run.failure.node}` cannot run on meta tensors ({run.failure.error}); "
                      f"shapes at {'x'.join(map(str, input_shape[2:]))} come from a real forward."]
        return real
    return run


def meta_tensor_shapes(gm: torch.fx.GraphModule, inputs: list[Any]) -> dict[str, torch.Size]:
    """Shape of every tensor-valued node for these inputs (tensors or Python values), computed on
    meta tensors with the shape rules and memo: no compute, no weight copies. Raises whatever the
    graph raises (an op without a meta kernel, a data-dependent size)."""
    shapes: dict[str, torch.Size] = {}

    class _Recorder(_MetaInterpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, TENSOR_LIKE):
                shapes[n.name] = out.shape
            return out

    with meta_weights(gm), torch.no_grad():
        _Recorder(gm).run(*[_to_meta(v) for v in inputs])
    return shapes


def _propagate(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], *, real: bool,
               probe_values: bool = True) -> ConcreteRun:
    run = ConcreteRun(tuple(input_shape))
    shapes = run.shapes
    base = _PropagationInterpreter if real else _MetaInterpreter

    class _Recorder(base):
        def run_node(self, n):
            out = super().run_node(n)
            shapes[n.name] = _shape_of(out)
            if isinstance(out, int) and not isinstance(out, bool):
                run.sizes[n.name] = out
            return out

    # real values can decide shapes (nonzero, masks): no shortcuts on real tensors
    interp = _Recorder(gm, fast=False) if real else _Recorder(gm, probe_values=probe_values)
    ctx = contextlib.nullcontext() if real else meta_weights(gm)
    x = torch.randn(input_shape) if real else torch.empty(input_shape, device="meta")
    with ctx, torch.no_grad():
        try:
            interp.run(x)
        except Exception as exc:  # noqa: BLE001 - a failing node is a finding, not a crash
            node = interp.current.name if interp.current is not None else "?"
            run.failure = NodeFailure(node, _short(exc), classify_exception(exc))
    for name, cond in interp.skipped_asserts.items():
        if _is_false(cond):
            run.failed_asserts.append(name)
    run.probe_failures = getattr(interp, "probe_failures", {})
    return run


def _is_false(cond: Any) -> bool:
    if isinstance(cond, bool):
        return not cond
    if isinstance(cond, torch.Tensor) and cond.numel() == 1 and not cond.is_meta:
        return not bool(cond)
    return False


@contextlib.contextmanager
def _quiet_sympy_warnings() -> Iterator[None]:
    """torch logs a warning for every size expression it cannot evaluate statically ("failed to
    eval int_floordiv(...)"): expected here, where every size is symbolic."""
    import logging

    loggers = [logging.getLogger(name) for name in ("torch.fx.experimental.sym_node",
                                                    "torch.fx.experimental.symbolic_shapes",
                                                    "torch.utils._sympy.interp",  # "failed while executing"
                                                    "torch._subclasses.fake_tensor")]  # our budget's exception
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _light_floordiv_simplify() -> Iterator[None]:
    """torch's `FloorDiv`/`ModularIndexing` divide out a common factor and then call
    `sympy.simplify` on the quotient, which tries every simplification strategy: seconds per call
    on a windowed model's nested pad expressions (Swin's `window_reverse`: 3 s). The quotient is
    an exact polynomial division, so `sympy.cancel` gives an equal expression in milliseconds.
    Only that module's `sympy.simplify` changes, and only during the run."""
    import types

    import sympy
    from torch.utils._sympy import functions

    def cancel(expr: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return sympy.cancel(expr)
        except (sympy.PolynomialError, TypeError, ValueError, NotImplementedError):  # the original path
            return sympy.simplify(expr, *args, **kwargs)

    original = getattr(functions, "sympy", None)
    if original is not sympy:  # another torch layout: leave it alone
        yield
        return
    light = types.ModuleType("sympy")
    light.__dict__.update(vars(sympy))
    light.simplify = cancel
    functions.sympy = light
    try:
        yield
    finally:
        functions.sympy = original


class SymbolicBudgetExceeded(BaseException):  # not Exception: code that swallows errors must not swallow it
    """The symbolic run took longer than its budget."""


class _Budget:
    """The state of one `time_budget`: the timer's exception can be swallowed where the signal
    lands (a weakref callback: "Exception ignored in ..."), so code that runs step by step also
    calls `check()` between steps."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.expired = False

    def error(self) -> SymbolicBudgetExceeded:
        return SymbolicBudgetExceeded(
            f"the symbolic run exceeded its {self.seconds:g} CPU-second budget (size expressions grow with every "
            "padded/windowed stage)")

    def check(self) -> None:
        if self.expired:
            raise self.error()


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[_Budget]:
    """Raise `SymbolicBudgetExceeded` in this block after `seconds` of CPU time used by this
    process (main thread only: an ITIMER_VIRTUAL timer, which can interrupt a single op stuck in
    sympy; elsewhere no limit). CPU time, not wall time: on a busy machine (a test run beside a
    build, the zoo's parallel jobs) the run still gets as far, so the report does not depend on
    the load. Yields a `_Budget` whose `check()` re-raises once the time is up."""
    import signal
    import threading

    budget = _Budget(seconds)
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield budget
        return

    def expired(signum, frame):
        budget.expired = True
        raise budget.error()

    previous = signal.signal(signal.SIGVTALRM, expired)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield budget
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class _AnalysisShapeEnv(ShapeEnv):
    """A ShapeEnv that locates each symbol and guard at the first frame outside torch. Torch's own
    walk imports torch.export, dynamo and inductor on its first use, only to learn which files to
    skip: 0.2 s of every analysis in a fresh process (a CLI run), more than a whole warm ResNet-50
    analysis. mixfx attributes guards to fx nodes itself and never reads these locations."""

    def _get_stack_summary(self, is_debug: bool = False, framework_loc: str | None = None):
        if is_debug:
            return super()._get_stack_summary(is_debug, framework_loc)
        if framework_loc is None:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                frame = frame.f_back
            if frame is not None:
                framework_loc = traceback.FrameSummary(frame.f_code.co_filename, frame.f_lineno,
                                                       frame.f_code.co_name)
        return SLoc(framework_loc, None), ""


def propagate_symbolic(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], *,
                       budget_s: float | None = None) -> SymbolicRun:
    """Run `gm` on a fake tensor whose dims after (batch, channels) are symbols; never raises for
    failures inside the graph (recorded in `.failure`). With `budget_s`, a run that takes longer
    stops at the node it reached (failure kind "timeout"): some windowed models (Swin, DaViT,
    Hiera) build size expressions that take sympy minutes to simplify."""
    env = _AnalysisShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    rank = len(input_shape)
    dyn = [DimDynamic.STATIC] * min(rank, 2) + [DimDynamic.DYNAMIC] * max(rank - 2, 0)
    with mode:
        pass
    fake_x = mode.from_tensor(torch.empty(input_shape, device="meta"),
                              symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))
    names = spatial_symbol_names(rank)
    symbols = {name: fake_x.shape[2 + i].node.expr for i, name in enumerate(names)} if rank > 2 else {}
    run = SymbolicRun(env, symbols)

    budget: _Budget | None = None

    class _Recorder(_PropagationInterpreter):
        def run_node(self, n):
            if budget is not None:
                budget.check()  # the timer's own exception may have been swallowed mid-op
            before = len(env.guards)
            try:
                out = super().run_node(n)
            finally:
                if len(env.guards) > before:
                    run.guards[n.name] = [g.expr for g in env.guards[before:]]
            run.values[n.name] = out
            return out

    interp = _Recorder(gm)
    from torch._dispatch.python import enable_python_dispatcher

    # The Python dispatcher lets composite ops (F.interpolate with a SymInt size) decompose.
    with meta_weights(gm), mode, enable_python_dispatcher(), _quiet_sympy_warnings(), _light_floordiv_simplify():
        try:
            with time_budget(budget_s) as budget:
                interp.run(fake_x)
        except SymbolicBudgetExceeded as exc:
            node = interp.current.name if interp.current is not None else "?"
            run.failure = NodeFailure(node, str(exc).splitlines()[0], "timeout")
        except Exception as exc:  # noqa: BLE001
            node = interp.current.name if interp.current is not None else "?"
            run.failure = NodeFailure(node, _short(exc), classify_exception(exc))
    for name, cond in interp.skipped_asserts.items():
        expr = getattr(getattr(cond, "node", None), "expr", cond)
        run.asserts[name] = expr
    return run
