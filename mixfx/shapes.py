"""Shape propagation over an fx graph: one symbolic run, and cheap concrete runs.

- `propagate_symbolic` runs the graph on fake tensors whose spatial dims are ShapeEnv symbols
  (FakeTensorMode + ShapeEnv, `DimDynamic.DYNAMIC` per dim so that H and W stay distinct and are
  not 0/1-specialised). Every guard the ShapeEnv records is attributed to the node that created it;
  explicit checks (`torch._assert`, timm's `_assert`, export's `_guards_fn`) are recorded but not
  enforced, so that propagation continues past a size check to the structural cause behind it.
- `propagate_concrete` runs the graph on meta tensors at one concrete input size (weights swapped
  for meta copies: no compute, no weight memory) and records per-node shapes, the failing node,
  and which explicit checks would have failed. It is ~10x cheaper than the symbolic run.

Shape-preserving modules (BatchNorm, activations, dropout) are short-cut in both: fake-tensor
BatchNorm alone costs 60% of a symbolic ResNet-50 run, and their output shape is their input's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from mixfx.tracing import is_assert_target

# Output shape == input shape, and no check beyond the channel count (done below for BatchNorm).
SHAPE_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.PReLU,
)


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple/list/dict output, in order."""
    if isinstance(value, torch.Tensor):
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
    if "meta tensor" in text or "on meta" in text or "'meta'" in text:
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
    """Interpreter that skips explicit checks and short-cuts shape-preserving modules."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.current: torch.fx.Node | None = None
        self.skipped_asserts: dict[str, Any] = {}
        self._shape_cache: dict[Any, torch.Tensor] = {}

    def _dense_or_norm_shape(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Linear/LayerNorm output without the decomposed matmul/normalisation: the same size
        check the kernel makes (so a token-mixing Linear still records its `Eq(tokens, 196)`
        guard). Outputs of one shape are shared: building a fake tensor with symbolic sizes is the
        expensive part of a symbolic run."""
        if isinstance(mod, nn.Linear):
            if x.dim() == 0 or x.shape[-1] != mod.in_features:
                raise RuntimeError(f"Linear expects {mod.in_features} input features, got shape {list(x.shape)}")
            if mod.out_features == mod.in_features:
                return x
            key = (tuple(str(d) for d in x.shape[:-1]), mod.out_features, x.dtype, x.device)
            if key not in self._shape_cache:
                self._shape_cache[key] = x.new_empty((*x.shape[:-1], mod.out_features))
            return self._shape_cache[key]
        k = len(mod.normalized_shape)
        if x.dim() < k or any(a != b for a, b in zip(x.shape[-k:], mod.normalized_shape)):
            raise RuntimeError(f"LayerNorm over {list(mod.normalized_shape)} got shape {list(x.shape)}")
        return x

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
        if n.op == "call_module":
            mod = self.fetch_attr(str(n.target))
            if isinstance(mod, SHAPE_PRESERVING_MODULES) and len(n.args) == 1 and not n.kwargs:
                (x,) = self.fetch_args_kwargs_from_env(n)[0]
                if isinstance(x, torch.Tensor):
                    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and x.shape[1] != mod.num_features:
                        raise RuntimeError(f"{type(mod).__name__} expects {mod.num_features} channels, got {x.shape[1]}")
                    # Only shapes matter here, and a new fake tensor with symbolic sizes costs a
                    # symbolic stride computation: pass the input through.
                    return x
            if isinstance(mod, (nn.Linear, nn.LayerNorm)) and len(n.args) == 1 and not n.kwargs:
                (x,) = self.fetch_args_kwargs_from_env(n)[0]
                if isinstance(x, torch.Tensor):
                    return self._dense_or_norm_shape(mod, x)
        return super().run_node(n)


def _meta_state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v if v.is_meta else torch.empty_like(v, device="meta"))
            for k, v in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]}


@contextlib.contextmanager
def meta_weights(gm: torch.nn.Module) -> Iterator[None]:
    """Temporarily swap every parameter and buffer for a meta tensor of the same shape."""
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(gm, _meta_state(gm), tie_weights=True, strict=False):
        yield


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return torch.empty_like(value, device="meta")
    return value


class _MetaInterpreter(_PropagationInterpreter):
    def get_attr(self, target, args, kwargs):  # plain tensor attributes that are not buffers
        return _to_meta(super().get_attr(target, args, kwargs))


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape_of(v) for v in value]
    if isinstance(value, dict):
        return {k: _shape_of(v) for k, v in value.items()}
    return None


def propagate_concrete(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], *, allow_real: bool = True) -> ConcreteRun:
    """Run `gm` on a meta tensor of `input_shape`; never raises for failures inside the graph.

    Where a node cannot run on meta tensors (data-dependent control flow in a leaf module, an op
    without a meta kernel) and the model has real weights, the run is repeated on a real random
    input (real compute, so only as a fallback)."""
    run = _propagate(gm, input_shape, real=False)
    if (allow_real and run.failure is not None and run.failure.kind in ("data_dependent", "unsupported")
            and not any(t.is_meta for t in [*gm.parameters(), *gm.buffers()])):
        real = _propagate(gm, input_shape, real=True)
        real.notes = [f"`{run.failure.node}` cannot run on meta tensors ({run.failure.error}); "
                      f"shapes at {'x'.join(map(str, input_shape[2:]))} come from a real forward."]
        return real
    return run


def _propagate(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], *, real: bool) -> ConcreteRun:
    run = ConcreteRun(tuple(input_shape))
    shapes = run.shapes
    base = _PropagationInterpreter if real else _MetaInterpreter

    class _Recorder(base):
        def run_node(self, n):
            out = super().run_node(n)
            shapes[n.name] = _shape_of(out)
            return out

    interp = _Recorder(gm)
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
    return run


def _is_false(cond: Any) -> bool:
    if isinstance(cond, bool):
        return not cond
    if isinstance(cond, torch.Tensor) and cond.numel() == 1 and not cond.is_meta:
        return not bool(cond)
    return False


def propagate_symbolic(gm: torch.fx.GraphModule, input_shape: tuple[int, ...]) -> SymbolicRun:
    """Run `gm` on a fake tensor whose dims after (batch, channels) are symbols; never raises for
    failures inside the graph (recorded in `.failure`)."""
    env = ShapeEnv()
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

    class _Recorder(_PropagationInterpreter):
        def run_node(self, n):
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
    with meta_weights(gm), mode, enable_python_dispatcher():
        try:
            interp.run(fake_x)
        except Exception as exc:  # noqa: BLE001
            node = interp.current.name if interp.current is not None else "?"
            run.failure = NodeFailure(node, _short(exc), classify_exception(exc))
    for name, cond in interp.skipped_asserts.items():
        expr = getattr(getattr(cond, "node", None), "expr", cond)
        run.asserts[name] = expr
    return run
