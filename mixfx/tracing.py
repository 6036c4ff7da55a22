"""Turning an nn.Module into a torch.fx graph.

Two tracers, tried in order:
1. `torch.fx` symbolic tracing (module level: `call_module` Linear/Conv nodes, which the rewrite
   passes need), with leaf modules and autowrapped functions: the user's `--leaf` names, and
   timm's own FX lists when timm is importable (they turn 85% -> 99.8% of timm models traceable).
2. Non-strict `torch.export` with `Dim.AUTO` sizes, for models with Python control flow on shapes.
   Its aten-level graph keeps `nn_module_stack`, so nodes are still attributed to module paths;
   shape branches are taken at the example size (recorded as guards).

A traced graph is not always a correct one (timm's levit/hiera caches), so the fx graph is run once
against the eager model on meta tensors and rejected when they disagree.
"""
from __future__ import annotations

import contextlib
import linecache
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn

from mixfx import progress
from mixfx.errors import TraceError

Leaf = str | type


@dataclass
class TraceResult:
    """A traced model. `tracer` is "fx" (module-level graph), "export" (aten-level graph) or
    "opaque" (the whole model as one node: no tracer got through within its budget)."""

    graph_module: torch.fx.GraphModule
    tracer: str
    attempts: list[str] = field(default_factory=list)  # why earlier tracers were not used
    # the graph's clean meta run at the example input, from the eager check: the analysis reuses it
    example_run: Any = None
    # export only: the guards torch.export added while tracing, as (condition over the input dims
    # "s2", "s3" ... renamed to dim indices, source location): branches on sizes and specialisations
    export_guards: list[tuple[str, str]] = field(default_factory=list)
    # export only: the graph was exported at the example size (dynamic H, W took too long)
    specialised: bool = False

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph


def _timm_fx_lists() -> tuple[set[type], set[Callable]]:
    """timm's leaf modules and autowrapped functions, if timm is already imported (a timm
    model implies it is; importing timm just for this would cost ~1.5 s per process)."""
    import sys

    if "timm" not in sys.modules:
        return set(), set()
    try:
        from timm.layers import _fx as timm_fx  # type: ignore[import-not-found]
    except Exception:  # timm missing or too old: no extra lists
        return set(), set()
    return set(getattr(timm_fx, "_leaf_modules", ())), set(getattr(timm_fx, "_autowrap_functions", ()))


class MixfxTracer(torch.fx.Tracer):
    """fx Tracer with extra leaf modules, given as types, class names or module paths."""

    def __init__(self, leaves: Sequence[Leaf] = (), autowrap: Sequence[Callable] = (), use_timm: bool = True):
        timm_leaves, timm_autowrap = _timm_fx_lists() if use_timm else (set(), set())
        super().__init__(autowrap_functions=tuple(set(autowrap) | timm_autowrap))
        self.leaf_types = {leaf for leaf in leaves if isinstance(leaf, type)} | timm_leaves
        self.leaf_names = {leaf for leaf in leaves if isinstance(leaf, str)}

    def trace(self, root, concrete_args=None):  # noqa: D102 - fx's, with a fresh attribute index
        self._attr_names: dict[tuple[str, int], str] | None = None
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's rule (a parameter, or a buffer, read as a module attribute becomes a `get_attr`
        node under its first qualified name), with the name found in an index built once: fx scans
        `root.named_parameters()` on every such read, 0.3 s for FastViT's layer scales."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._attr_names is None:
            names: dict[tuple[str, int], str] = {}
            for prefix, tensors in (("p", self.root.named_parameters()), ("b", self.root.named_buffers())):
                for name, t in tensors:
                    names.setdefault((prefix, id(t)), name)
            self._attr_names = names
        is_param = isinstance(attr_val, nn.Parameter)
        name = self._attr_names.get(("p", id(attr_val))) if is_param else None
        if name is None and self.proxy_buffer_attributes:
            name = self._attr_names.get(("b", id(attr_val)))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.leaf_types or type(m).__name__ in self.leaf_names:
            return True
        if module_qualified_name in self.leaf_names:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fx_trace(
    model: nn.Module,
    *,
    leaves: Sequence[Leaf] = (),
    autowrap: Sequence[Callable] = (),
    use_timm: bool = True,
    concrete_args: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Module-level torch.fx trace. Raises `TraceError` naming the offending source line."""
    tracer = MixfxTracer(leaves, autowrap, use_timm)
    try:
        with _no_leftover_proxies(model):
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # noqa: BLE001 - every tracing failure becomes a TraceError
        message, hint = _explain_trace_failure(exc, model)
        root = type(model)
        if root in tracer.leaf_types or root.__name__ in tracer.leaf_names:
            hint = f"(--leaf {root.__name__} names the top-level module itself, which cannot be a leaf.) " + hint
        raise TraceError(message, hint) from exc
    name = type(model).__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, torch.fx.Proxy):
        return True
    if isinstance(value, dict):
        return any(isinstance(v, torch.fx.Proxy) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.fx.Proxy) for v in value)
    return False


@contextlib.contextmanager
def _no_leftover_proxies(model: nn.Module):
    """Tracing runs forward() on Proxies, so a module that caches what forward() computed
    (timm's attention-bias caches: `self.cache[device] = ...`) is left holding a Proxy of a
    finished graph, and the next trace of the same model references a node that no longer
    exists. Every attribute that ends up holding one gets its value from before the trace."""
    saved = []
    for mod in model.modules():
        state = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in vars(mod).items()
                 if not k.startswith("_")}
        saved.append((mod, state))
    try:
        yield
    finally:
        for mod, state in saved:
            for k, v in list(vars(mod).items()):
                if not k.startswith("_") and _holds_proxy(v):
                    if k in state:
                        setattr(mod, k, state[k])
                    else:
                        delattr(mod, k)


def _explain_trace_failure(exc: BaseException, model: nn.Module) -> tuple[str, str]:
    """Message + hint: the user's source line that failed, and what to do about it: the submodule
    to make a leaf (one that contains the failing line, never the root: the root cannot be a
    leaf), or, when the line is in the root's own forward, how to write it traceably."""
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    user = [f for f in frames if not f.filename.startswith(torch_dir) and "mixfx/" not in f.filename]
    where, leaf, in_root = "", None, False
    if user:
        f = user[-1]
        line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
        where = f" at {f.filename}:{f.lineno} (`{line}`) in {f.name}()"
        # innermost first: the closest submodule whose class holds a frame of the failing call
        for frame in reversed(user):
            owners = _modules_defined_at(model, frame.filename, frame.lineno)
            leaf = next((cls for path, cls in owners if path), None)
            if leaf is not None:
                break
            in_root = in_root or any(not path for path, _ in owners)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    root = type(model).__name__
    message = f"torch.fx could not trace {root}{where}: {first}."
    control_flow = "control flow" in first or "iterate" in first or "bool" in first.lower()
    if control_flow:
        hint = "Python control flow on tensor values or shapes cannot be traced symbolically."
    else:
        hint = "This code cannot be traced symbolically."
    if leaf:
        hint += f" Try `--leaf {leaf}` to treat that submodule as one opaque node, or wrap the function with torch.fx.wrap."
    elif in_root:
        hint += (f" The line is in {root}.forward itself (the top-level module), so there is no submodule to pass "
                 "to --leaf: write the branch without Python control flow on tensor values (torch.where(cond, a, b) "
                 "computes both sides), or move it into a submodule and pass that submodule's class with --leaf.")
    else:
        hint += (" Wrap the function that contains it with torch.fx.wrap, or pass the submodule that calls it "
                 "with --leaf ClassName.")
    return message, hint


def _modules_defined_at(model: nn.Module, filename: str, lineno: int) -> list[tuple[str, str]]:
    """(path, class name) of the modules in `model` whose class source contains filename:lineno
    ("" is the root)."""
    import inspect

    holds: dict[type, bool] = {}
    out = []
    # each class once, and only those defined in that file (getsourcelines re-parses the file:
    # 14 ms a call, 13 s over the 950 modules of a Gemma4 ViT)
    for path, m in model.named_modules():
        cls = type(m)
        if cls not in holds:
            holds[cls] = False
            try:
                if inspect.getsourcefile(cls) == filename:
                    lines, start = inspect.getsourcelines(cls)
                    holds[cls] = start <= lineno < start + len(lines)
            except (OSError, TypeError):
                pass
        if holds[cls]:
            out.append((path, cls.__name__))
    return out


def _where(sloc: Any) -> str:
    """`file:line in function` of a guard's source location (torch's own text cuts long paths
    to their last characters); paths under the working directory are shown relative to it."""
    import os

    frame = getattr(sloc, "framework_loc", None)
    if isinstance(frame, traceback.FrameSummary):
        path = frame.filename
        if not os.path.relpath(path).startswith(".."):
            path = os.path.relpath(path)
        return f"{path}:{frame.lineno} in {frame.name}"
    return str(sloc).strip().strip("()")


class _GuardLog:
    """Collects the guards torch's ShapeEnv logs while torch.export traces (`eval <expr> [guard
    added] (<file:line> in <fn>)`), with the symbols renamed `d2`, `d3` ... after the input dim
    they stand for. Read from the log record's arguments, not its text; only for explanations:
    where a branch on a size or a specialisation happened."""

    def __init__(self) -> None:
        import logging

        self.symbols: dict[str, int] = {}
        self.guards: list[tuple[str, str]] = []
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    outer.read(record)
                except Exception:  # noqa: BLE001 - an explanation, never a failure
                    pass

        self.handler = Handler(level=logging.INFO)
        self.logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")

    def read(self, record: Any) -> None:
        msg, args = str(record.msg), record.args or ()
        if msg.startswith("create_symbol") and len(args) >= 3:
            m = re.search(r"size\(\)\[(\d+)\]", str(args[2]))
            if m:
                self.symbols[str(args[0])] = int(m.group(1))
        elif "[guard added]" in msg and len(args) >= 3:
            expr = str(args[1])
            for sym, dim in self.symbols.items():
                expr = re.sub(rf"\b{sym}\b", f"d{dim}", expr)
            if re.search(r"\bs\d+\b", expr):
                return  # a symbol that is not an input dim (a data-dependent size)
            self.guards.append((expr, _where(args[2])))

    def __enter__(self) -> "_GuardLog":
        import logging

        self.level = self.logger.level
        # torch's own handlers on this logger keep printing only what they printed before
        self.others = [(h, h.level) for h in self.logger.handlers]
        for h, _ in self.others:
            h.setLevel(max(h.level, self.logger.getEffectiveLevel()))
        self.logger.addHandler(self.handler)
        if not self.logger.isEnabledFor(logging.INFO):
            self.logger.setLevel(logging.INFO)
        self.propagate = self.logger.propagate
        self.logger.propagate = False  # collected here, not printed
        self.disabled = self.logger.disabled
        self.logger.disabled = False  # quiet_torch disables torch's loggers: this one is read, not printed
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
        for h, level in self.others:
            h.setLevel(level)
        self.logger.propagate = self.propagate
        self.logger.disabled = self.disabled


def export_trace(model: nn.Module, example_input: torch.Tensor,
                 guards: list[tuple[str, str]] | None = None, *, dynamic: bool = True) -> torch.fx.GraphModule:
    """Non-strict `torch.export` with automatic dynamic spatial dims (every dim after the 2nd), or
    static ones (`dynamic=False`). `guards`, if given, receives the guards export added (see
    `_GuardLog`)."""
    from torch.export import Dim

    dims = {d: Dim.AUTO for d in range(2, example_input.dim())} if dynamic else None
    try:
        with quiet_torch(), _GuardLog() as log:
            program = torch.export.export(model, (example_input,), dynamic_shapes=(dims,) if dims else None,
                                          strict=False)
        if guards is not None:
            guards.extend(log.guards)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TraceError(
            f"torch.export could not trace {type(model).__name__} either: {first}.",
            "Run with --debug for the full trace; marking the failing module with --leaf may help.",
        ) from exc
    return program.module()


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's loggers (export logs whole aten graphs when a trace fails; symbolic_shapes
    warns about internals) and anything written to stderr while inside: the failure reaches the
    user as one TraceError paragraph instead. `--debug` still shows the traceback."""
    import io
    import logging

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    saved = [(lg, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, disabled in saved:
            lg.disabled = disabled


def _graph_agrees_with_eager(gm: torch.fx.GraphModule, model: nn.Module,
                             example_input: torch.Tensor) -> tuple[str | None, Any]:
    """(None, the graph's meta run) when the traced graph gives the same output shapes as the
    eager model (on meta tensors: no compute, no weight memory; both with the shape-propagation
    shortcuts), else (the reason it does not, None)."""
    from mixfx.shapes import eager_meta_forward, flatten_outputs, propagate_concrete

    try:
        want = eager_meta_forward(model, example_input.shape, example_input.dtype)
    except Exception:  # noqa: BLE001 - the eager model itself rejects the input: the analysis says why
        return None, None
    run = propagate_concrete(gm, tuple(example_input.shape), allow_real=False)
    if run.failure is not None and run.failure.kind not in ("data_dependent", "unsupported"):
        return f"the fx graph fails to run: {run.failure.error}", None
    if run.failure is not None:
        return None, None  # cannot tell on meta tensors; the analysis reports the node
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    recorded = run.shapes.get(out_node.name)
    if recorded is None:
        return None, run  # an output type the recorder does not read (a dataclass): nothing to compare
    got_shapes = [tuple(s) for s in _flatten_shapes(recorded)]
    want_shapes = [tuple(t.shape) for t in flatten_outputs(want)]
    if got_shapes != want_shapes:
        return f"the fx graph's outputs {got_shapes} differ from the eager model's {want_shapes}", None
    return None, run


def _flatten_shapes(shapes: Any) -> list[tuple[int, ...]]:
    """Shapes recorded by `propagate_concrete` for a (nested) output, in `flatten_outputs` order."""
    if isinstance(shapes, tuple):
        return [shapes]
    if isinstance(shapes, dict):
        return [s for v in shapes.values() for s in _flatten_shapes(v)]
    if isinstance(shapes, list):
        return [s for v in shapes for s in _flatten_shapes(v)]
    return []


def trace(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    leaves: Sequence[Leaf] = (),
    autowrap: Sequence[Callable] = (),
    allow_export: bool = True,
    check: bool = True,
    export_budget_s: float | None = None,
) -> TraceResult:
    """Trace `model` with torch.fx, falling back to non-strict torch.export (needs `example_input`).

    `check=True` runs the fx graph against the eager model once (fake tensors) and falls back
    when they disagree. `export_budget_s` caps the dynamic-shape export in CPU-seconds (windowed
    models build size expressions sympy takes minutes over): past it the model is exported at the
    example size (`TraceResult.specialised`), and says so."""
    with progress.step("tracing"):
        return _trace_with_fallbacks(model, example_input, leaves=leaves, autowrap=autowrap,
                                     allow_export=allow_export, check=check, export_budget_s=export_budget_s)


def _trace_with_fallbacks(model: nn.Module, example_input: torch.Tensor | None, *, leaves: Sequence[Leaf],
                          autowrap: Sequence[Callable], allow_export: bool, check: bool,
                          export_budget_s: float | None) -> TraceResult:
    attempts: list[str] = []
    fx_error: TraceError | None = None
    optional = _optional_arguments(model)
    # `if mask is not None:` is traced as taken when `mask` is a Proxy: on failure, trace again
    # with forward()'s optional arguments fixed to their default None (timm's Hiera)
    for concrete in ([None, optional] if optional else [None]):
        label = "fx" if concrete is None else f"fx with {', '.join(concrete)}=None"
        progress.stage(f"tracing with torch.{label}")
        try:
            gm = fx_trace(model, leaves=leaves, autowrap=autowrap, concrete_args=concrete)
        except TraceError as exc:
            fx_error = fx_error or exc
            attempts.append(f"{label}: {exc.message}")
            continue
        problem, run = (_graph_agrees_with_eager(gm, model, example_input) if (check and example_input is not None)
                        else (None, None))
        if problem is None:
            if concrete is not None:
                attempts.append(f"{label}: the graph agrees with the eager model")
            return TraceResult(gm, "fx", attempts, example_run=run)
        attempts.append(f"{label}: {problem}")
    if not allow_export or example_input is None:
        if fx_error is not None:
            raise fx_error
        raise TraceError(f"torch.fx traced {type(model).__name__} but the graph is wrong: {attempts[-1]}.",
                         "Try --leaf for the module involved.")
    if example_input.is_meta and not any(p.is_meta for p in model.parameters()):
        example_input = torch.zeros(example_input.shape, dtype=example_input.dtype)  # export runs the model
    progress.stage("tracing with torch.export (torch.fx could not)")
    from mixfx.shapes import SymbolicBudgetExceeded, time_budget

    guards: list[tuple[str, str]] = []
    specialised = False
    try:
        try:
            # an interrupted trace can leave SymInts in the model's caches (Swin's attention masks):
            # under a budget it traces a copy (parameters shared, so no weight memory is copied)
            subject = _shallow_copy(model) if export_budget_s else model
            with time_budget(export_budget_s):
                gm = export_trace(subject, example_input, guards)
        except SymbolicBudgetExceeded:
            guards.clear()
            attempts.append(f"torch.export with dynamic H, W: over its {export_budget_s:g} CPU-second budget; the "
                            "model is analysed as one opaque module (its ops are still judged one by one on the "
                            "eager forward; which sizes run comes from eager runs)")
            return TraceResult(_opaque_graph(model), "opaque", attempts, specialised=True)
    except TraceError as exc:
        if fx_error is not None:
            raise TraceError(fx_error.message + f" The torch.export fallback failed too ({exc.message.rstrip('.')}).",
                             fx_error.hint) from exc
        raise
    return TraceResult(gm, "export", attempts, export_guards=guards, specialised=specialised)


class _Whole(nn.Module):
    """The model as one leaf of a one-node graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def _opaque_graph(model: nn.Module) -> torch.fx.GraphModule:
    """placeholder -> call_module `model` -> output: for a model no tracer gets through in time."""
    root = _Whole(model)
    return torch.fx.GraphModule(root, MixfxTracer(leaves=(type(model),), use_timm=False).trace(root), "Opaque")


def _shallow_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors: state a
    trace writes into the copy's attributes does not reach the original."""
    import copy

    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _optional_arguments(model: nn.Module) -> dict[str, None]:
    """forward()'s arguments after the input whose default is None (`mask=None`)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: None for p in params if p.kind in kinds and p.default is None}


_ASSERT_NAMES = re.compile(r"^_?assert")


def is_assert_target(target: Any) -> bool:
    """An explicit check node: torch._assert, torch._check*, aten._assert_*, timm's `_assert`."""
    name = getattr(target, "__name__", None) or str(target)
    if name.startswith("aten."):
        name = name[5:]
    return bool(_ASSERT_NAMES.match(name)) or name.startswith("_check") or name.startswith("_assert")
