"""Receptive field of every spatial node, in input pixels (Araujo, Norris & Sim, Distill 2019,
generalised to DAGs).

Why a separate walk: the receptive field is what makes a network usable past its training size and
what an exact tiler needs (`mixfx.tiling`). It is computed on the traced fx graph, one node at a
time, during one meta-tensor run at a concrete size (milliseconds: the shape rules of
`mixfx.shapes` do the shapes, no compute). Each tensor dim that carries an input spatial axis gets
an affine map: output position `i` reads input positions `[stride*i + lo, stride*i + hi]`. A conv
with kernel k, stride s, padding p, dilation d composes `(s, -p, -p + (k-1)*d)` onto its input's
map (r_in = s*r_out + (k-1)*d in closed form); elementwise ops and concatenation over channels take
the union of their inputs' maps (max over paths, offsets aligned); upsampling by an integer factor is
a stride 1/s (exact fractions); a transposed conv is the inverse. Bounds stay conservative where a
floor is involved (nearest/bilinear resampling): never smaller than the truth.

An op whose extent grows with the input makes the field unbounded from there: a global pool whose
result is broadcast back (SE gate), GroupNorm/InstanceNorm/LayerNorm statistics over H, W, attention,
an adaptive pool to a fixed grid, a resize to a fixed size. An op without a rule here is unbounded
too, with the reason "no receptive-field rule for X": never a guess.
"""
from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn

from mixfx.report import ReceptiveField
from mixfx.shape_rules import TENSOR_LIKE


# ----------------------------------------------------------------------------- data
Edge = tuple  # (stride, lo, hi, ceil_lo): output j reads integer positions [round(stride*j+lo), floor(stride*j+hi)]


@dataclass(frozen=True)
class AxisMap:
    """Position `i` along one tensor dim reads input positions within `[stride*i + lo, stride*i + hi]`
    of input spatial axis `axis` (exact for integer strides; an envelope over the phases of a
    resampling otherwise). `align`: the lcm of the stride numerators of every node on the way (a
    tile origin that is a multiple of it puts every intermediate grid on the whole image's).
    `parents` keeps the exact integer maps it was built from, for `exact_size`."""

    axis: int
    stride: Fraction
    lo: Fraction
    hi: Fraction
    align: int = 1
    parents: tuple = field(default=(), compare=False, repr=False)  # ((AxisMap, Edge), ...)
    fractional: bool = field(default=False, compare=False)  # a resampling on the way: lo/hi are an envelope

    def then(self, stride: Fraction | int, lo: Fraction | int, hi: Fraction | int, ceil_lo: bool = False) -> "AxisMap":
        """The map after an op whose output position j reads this map's integer positions
        [floor(stride*j + lo) (ceil with `ceil_lo`), floor(stride*j + hi)]."""
        if type(stride) is int and type(lo) is int and type(hi) is int and not self.fractional:
            s = self.stride * stride  # integers all the way: no Fraction arithmetic (the common case)
            return AxisMap(self.axis, s, self.stride * lo + self.lo, self.stride * hi + self.hi,
                           math.lcm(self.align, s), ((self, (stride, lo, hi, ceil_lo)),), False)
        stride, lo, hi = Fraction(stride), Fraction(lo), Fraction(hi)
        low = lo
        if not ceil_lo:  # floor(x) >= x - (den-1)/den
            den = math.lcm(stride.denominator, lo.denominator)
            low = lo - Fraction(den - 1, den)
        s = self.stride * stride
        frac = self.fractional or any(v.denominator != 1 for v in (stride, lo, hi))
        return AxisMap(self.axis, _num(s), _num(self.stride * low + self.lo), _num(self.stride * hi + self.hi),
                       math.lcm(self.align, s.numerator), ((self, (stride, lo, hi, ceil_lo)),), frac)

    @property
    def size(self) -> int:
        """Most input pixels one output position reads (exact: see `exact_size`)."""
        return exact_size(self) if self.fractional else math.floor(self.hi - self.lo) + 1


_IDENTITY_EDGE = (1, 0, 0, False)


def _num(x: Fraction) -> int | Fraction:
    """An int where the fraction is whole: integer arithmetic is ~10x cheaper."""
    return int(x) if x.denominator == 1 else x


def exact_interval(m: AxisMap, i: int) -> tuple[int, int]:
    """The input positions output position `i` reads, walked back through the exact integer maps
    (hull over paths)."""
    order: list[AxisMap] = []
    seen: set[int] = set()
    stack: list[tuple[AxisMap, bool]] = [(m, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p, _ in node.parents)
    intervals: dict[int, tuple[int, int]] = {id(m): (i, i)}
    root = (i, i)
    for node in reversed(order):  # every node before its parents
        a, b = intervals[id(node)]
        if not node.parents:
            root = (a, b)
        for parent, (s, lo, hi, ceil_lo) in node.parents:
            pa, pb = s * a + lo, s * b + hi
            na, nb = (math.ceil(pa) if ceil_lo else math.floor(pa)), math.floor(pb)
            old = intervals.get(id(parent))
            intervals[id(parent)] = (na, nb) if old is None else (min(old[0], na), max(old[1], nb))
    return root


def exact_size(m: AxisMap) -> int:
    """Most input pixels one output position reads, over every phase of the resamplings."""
    period = min(math.lcm(m.stride.denominator, *_denominators(m)), 64)
    return max(b - a + 1 for a, b in (exact_interval(m, i) for i in range(period)))


def _denominators(m: AxisMap) -> set[int]:
    out: set[int] = set()
    stack, seen = [m], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        out.add(x.stride.denominator)
        stack.extend(p for p, _ in x.parents)
    return out


@dataclass(frozen=True)
class Unbounded:
    """Where and why the field stops being bounded."""

    node: str
    module: str | None
    reason: str
    lost: bool = False  # the walk lost the map (no rule, a reshape to tokens), not a known global op


@dataclass(frozen=True)
class Field:
    """The receptive field of one tensor: `dims[k]` is the map of tensor dim k (None: not a
    spatial dim). `static`: the tensor does not depend on the input at all (a weight, a size)."""

    dims: tuple[AxisMap | None, ...]
    unbounded: Unbounded | None = None
    static: bool = False

    def axes(self) -> dict[int, tuple[int, AxisMap]]:
        """input axis -> (tensor dim, map)"""
        return {m.axis: (d, m) for d, m in enumerate(self.dims) if m is not None}


@dataclass
class FieldRun:
    """Result of `compute_fields`: per node, its Field (a list of them for tuple outputs)."""

    input_shape: tuple[int, ...]
    n_axes: int
    fields: dict[str, Any]
    shapes: dict[str, Any]
    output_node: str | None  # the node whose value the graph returns first (None: not a tensor)

    def is_spatial(self, name: str) -> bool:
        f = self.fields.get(name)
        return isinstance(f, Field) and not f.static and len(f.axes()) == self.n_axes

    def receptive_field(self, name: str, varies: bool = False) -> ReceptiveField | None:
        """The report's view of one node: None unless the node carries every input spatial axis,
        or its shape `varies` with the input size (a map whose axes the walk lost inside an
        unbounded region: reported unbounded from there)."""
        if self.is_spatial(name):
            return to_receptive_field(self.fields[name], self.n_axes)
        f = self.fields.get(name)
        if varies and isinstance(f, Field) and f.unbounded is not None:
            return ReceptiveField(None, None, None, False, f.unbounded.module or f.unbounded.node, f.unbounded.reason)
        return None

    def pre_head(self, varying: set[str] | None = None) -> str | None:
        """The map the tiler reproduces: the output when it is spatial (fully convolutional),
        else the last spatial node in graph order (the map a classifier's head pools).

        `varying`, the nodes whose shape changes with the input size (from a second run), keeps a
        network whose map the walk lost track of (attention reshaping the map to tokens and back)
        from being mistaken for a classifier: its output varies, so the output is the target."""
        if self.output_node is not None and (self.is_spatial(self.output_node)
                                             or (varying is not None and self.output_node in varying)):
            return self.output_node
        last = None
        for name in self.fields:
            if self.is_spatial(name) or (varying is not None and name in varying
                                         and isinstance(self.fields[name], Field)
                                         and self.fields[name].unbounded is not None
                                         and any(d is not None for d in self.fields[name].dims)):
                last = name
        return last

    def varying(self, other: "FieldRun") -> set[str]:
        """Nodes whose output shape differs between this run and one at another input size."""
        return {name for name, shape in self.shapes.items()
                if shape is not None and name in other.shapes and other.shapes[name] != shape}


def to_receptive_field(f: Field, n_axes: int) -> ReceptiveField:
    axes = f.axes()
    maps = [axes[k][1] for k in range(n_axes)]
    if f.unbounded is not None:
        return ReceptiveField(None, None, None, False, f.unbounded.module or f.unbounded.node, f.unbounded.reason)
    return ReceptiveField(
        size=[m.size for m in maps],
        stride=[_number(m.stride) for m in maps],
        offset=[_number(Fraction(m.lo + m.hi) / 2) for m in maps],
        bounded=True)


def _number(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)


# ----------------------------------------------------------------------------- op tables
_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold,
    nn.Hardshrink, nn.Softshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.ChannelShuffle,
)
# pointwise calls aten does not tag `pointwise`, and Python spellings of tagged ones
_POINTWISE_EXTRA = {
    "hardswish", "prelu", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "feature_dropout", "native_dropout", "to", "float", "half", "double", "bfloat16", "type", "type_as", "contiguous",
    "detach", "requires_grad_", "cpu", "cuda", "_to_copy", "floor_divide", "truediv", "floordiv", "iadd", "isub",
    "imul", "itruediv", "radd", "rsub", "rmul", "rtruediv", "channel_shuffle", "native_channel_shuffle", "identity",
    "celu", "selu", "rrelu", "glu_none", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink", "relu6",
    "gelu", "silu", "mish", "mul", "add", "sub", "div", "neg", "pos", "invert", "and_", "or_", "xor",
}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "all", "any",
               "argmax", "argmin", "nansum", "nanmean", "median", "std_mean", "var_mean", "count_nonzero"}
_IDENTITY_VIEWS = {"contiguous", "clone", "detach"}
_STATIC_RESULTS = {"size", "dim", "numel", "getattr", "shape", "zeros_like", "ones_like", "empty_like", "full_like",
                   "new_zeros", "new_ones", "new_empty", "new_full", "arange", "zeros", "ones", "empty", "full",
                   "sym_size", "sym_numel", "sym_stride", "stride"}
_SUM_MAX_TUPLE = {"max", "min", "median", "std_mean", "var_mean"}


def _pointwise_name(name: str) -> bool:
    if name in _POINTWISE_EXTRA:
        return True
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return False
    try:
        return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())
    except (AttributeError, RuntimeError):
        return False


_POINTWISE_CACHE: dict[str, bool] = {}


def is_pointwise(name: str) -> bool:
    if name not in _POINTWISE_CACHE:
        _POINTWISE_CACHE[name] = _pointwise_name(name)
    return _POINTWISE_CACHE[name]


def op_name(target: Any) -> str:
    """A call's plain name: `conv2d`, `max_pool2d`, `add`, `mean`, `upsample_nearest2d`."""
    if isinstance(target, str):
        name = target
    else:
        packet = getattr(target, "_overloadpacket", None)
        name = getattr(packet, "__name__", None) or getattr(target, "__name__", None) or str(target)
    name = name.split(".")[-1]
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    while name.startswith("_"):
        name = name[1:]
    if name.endswith("_") and not name.endswith("__") and name not in ("and_", "or_"):
        name = name[:-1]  # in-place variants (x.add_, F.relu(inplace))
    for suffix in ("_with_indices", "_legit_no_training", "_legit"):
        name = name.removesuffix(suffix)
    return name.removeprefix("native_")


def _module_path(node: torch.fx.Node) -> str | None:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return str(path)
    return None


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        return v * n if len(v) == 1 else v
    return (int(v),) * n


class _Unsupported(Exception):
    """The op makes the field unbounded (or has no rule): the message says why. `keeps_layout`:
    the output still has the input's spatial dims (a norm: True; a global pool: False; an op
    without a rule: when its output has its input's shape), so later nodes stay spatial."""

    def __init__(self, reason: str, keeps_layout: bool | None = None, lost: bool | None = None):
        super().__init__(reason)
        self.keeps_layout = keeps_layout  # None: when the output has the input's shape
        self.lost = reason.startswith("no receptive-field rule") if lost is None else lost


# ----------------------------------------------------------------------------- the walk
def compute_fields(gm: torch.fx.GraphModule, input_shape: Sequence[int], *,
                   inference: bool = True) -> FieldRun:
    """Run `gm` on a meta input of `input_shape` and compute every node's Field.

    `inference=True` judges BatchNorm/Dropout by their eval behaviour whatever the module's mode
    (the analysis describes the deployed network); the tiler passes False, so that a model left in
    training mode is refused instead of being tiled wrong. Raises what the graph raises."""
    from mixfx.shapes import meta_weights

    input_shape = tuple(int(s) for s in input_shape)
    n_axes = max(len(input_shape) - 2, 0)
    with meta_weights(gm), torch.no_grad():
        run = _walk(gm, [torch.empty(input_shape, device="meta")], _Rules(gm, n_axes, inference))
    run.input_shape = input_shape
    return run


def _walk(gm: torch.fx.GraphModule, inputs: list[Any], rules: "_Rules") -> FieldRun:
    from mixfx.shapes import _MetaInterpreter

    fields: dict[str, Any] = {}
    shapes: dict[str, Any] = {}

    def getf(a: Any) -> Any:
        return _field_of(a, fields)

    class _Walk(_MetaInterpreter):
        last: tuple = (None, None)

        def fetch_args_kwargs_from_env(self, n: torch.fx.Node):  # once per node: the rules reuse them
            if self.last[0] is not n:
                self.last = (n, super().fetch_args_kwargs_from_env(n))
            return self.last[1]

        def run_node(self, n: torch.fx.Node) -> Any:
            args = kwargs = None
            if n.op in ("call_module", "call_function", "call_method"):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = super().run_node(n)
            fields[n.name] = rules.field(n, args, kwargs, out, getf)
            shapes[n.name] = _shape_of(out)
            return out

    _Walk(gm).run(*inputs)
    out_node = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    first = _first_node(out_node.args[0]) if out_node is not None and out_node.args else None
    return FieldRun((), rules.n_axes, fields, shapes, first.name if first is not None else None)


# relative results of leaf modules (`_Rules._inner`), per configuration and input shape; bounded
_INNER_LIMIT = 512


def _config_key(mod: nn.Module, depth: int = 0) -> Any:
    """What a forward's control flow can see: the class, plain attributes, which parameters and
    buffers are set, and the children's keys. None when an attribute is not a plain value."""
    if depth > 4:
        return None
    plain = (bool, int, float, str, type(None))
    attrs = []
    for k, v in vars(mod).items():
        if k in ("_parameters", "_buffers", "_modules") or (k.startswith("_") and k != "training"):
            continue
        if isinstance(v, plain) or (isinstance(v, tuple) and all(isinstance(x, plain) for x in v)):
            attrs.append((k, v))
        else:
            return None
    children = []
    for k, c in mod._modules.items():
        ck = _config_key(c, depth + 1) if c is not None else None
        if c is not None and ck is None:
            return None
        children.append((k, ck))
    return (type(mod), tuple(sorted(attrs)), tuple((k, v is None) for k, v in mod._parameters.items()),
            tuple((k, v is None) for k, v in mod._buffers.items()), tuple(children))


_INNER_RESULTS: dict[Any, Any] = {}


def _compose(actual: Field, rel: Field, node: str, prefix: str) -> Field:
    """A leaf module's result walked from identity maps, put onto the actual input's maps."""
    if rel.static:
        return rel
    axes = actual.axes()
    dims = []
    for m in rel.dims:
        if m is None:
            dims.append(None)
            continue
        base = axes[m.axis][1]
        out = base.then(m.stride, m.lo, m.hi, ceil_lo=True)  # the inner envelope as one edge
        dims.append(replace(out, align=math.lcm(out.align, base.stride.numerator * m.align)))
    unbounded = None
    if rel.unbounded is not None:
        path = f"{prefix}.{rel.unbounded.module}" if rel.unbounded.module else prefix
        unbounded = Unbounded(node, path, rel.unbounded.reason, rel.unbounded.lost)
    return Field(tuple(dims), unbounded)


class _Call:
    """Stands in for an fx node for one torch call of an eager walk."""

    __slots__ = ("op", "target", "args", "kwargs", "name", "meta")

    def __init__(self, func: Any, args: tuple, kwargs: dict):
        self.op, self.target, self.args, self.kwargs = "call_function", func, args, kwargs
        self.name, self.meta = op_name(func), {}


_FLOAT_ELEMENTWISE = {"relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu", "tanh", "mish", "elu",
                      "leaky_relu", "hardtanh", "clamp", "add", "sub", "mul", "div", "truediv", "neg", "dropout",
                      "iadd", "isub", "imul", "itruediv", "radd", "rsub", "rmul"}


def _float_elementwise(func: Any, args: tuple, kwargs: dict) -> Any:
    """The result of a float elementwise op on meta tensors, from broadcasting alone (the input
    itself when in place), or None to run the op."""
    raw = getattr(func, "__name__", "")
    if op_name(func) not in _FLOAT_ELEMENTWISE:
        return None
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors or not all(t.is_meta and t.dtype == tensors[0].dtype and t.is_floating_point() for t in tensors):
        return None
    if not isinstance(args[0], torch.Tensor) or kwargs.get("out") is not None:
        return None
    if kwargs.get("inplace") or (len(args) > 1 and args[-1] is True and raw in ("relu", "relu6", "hardswish",
                                                                              "hardsigmoid", "silu", "mish",
                                                                              "leaky_relu", "hardtanh", "elu",
                                                                              "dropout")) \
            or (raw.endswith("_") and not raw.endswith("__")) or raw.startswith("__i"):
        return args[0]
    shape = torch.broadcast_shapes(*(t.shape for t in tensors))
    return torch.empty(shape, dtype=tensors[0].dtype, device="meta")


def _eager_walk(mod: nn.Module, args: tuple, kwargs: dict, seeds: list[Any], rules: "_Rules") -> Any:
    """Run `mod` on meta tensors; every torch function call gets its field from `rules`, from the
    fields of its tensor arguments (by identity). Returns the fields of the output."""
    from torch.overrides import TorchFunctionMode

    from mixfx.shape_rules import NOT_HANDLED, ShapeRules, materialise

    args, kwargs = materialise(args), materialise(kwargs)
    fields: dict[int, tuple[Any, Any]] = {}  # id -> (value kept alive, field)

    def getf(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            entry = fields.get(id(a))
            return entry[1] if entry is not None and entry[0] is a else STATIC
        if isinstance(a, (list, tuple)):
            return [getf(x) for x in a]
        return STATIC

    def record(value: Any, fld: Any) -> None:
        if isinstance(value, torch.Tensor) and isinstance(fld, Field):
            fields[id(value)] = (value, fld)
        elif isinstance(value, (list, tuple)) and isinstance(fld, list):
            for v, f in zip(value, fld):
                record(v, f)

    for value, seed in zip(list(args) + list(kwargs.values()), seeds):
        record(value, seed)
    shape_rules = ShapeRules()

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            out = _float_elementwise(func, a, kw)  # meta kernels of elementwise ops run as Python refs (~1 ms)
            if out is None:
                out = shape_rules.function(func, a, kw)  # meta batch_norm & co. decompose slowly
            if out is NOT_HANDLED:
                out = func(*a, **kw)
            if _has_tensor(out):
                call = _Call(func, a, kw)
                rules.calls += 1
                call.name = f"{call.name}_{rules.calls}"
                record(out, rules.field(call, a, kw, out, getf))
            return out

    with _Mode(), torch.no_grad():
        result = mod(*args, **kwargs)
    return _map_values(result, getf) if not isinstance(result, torch.Tensor) else getf(result)


def _first_node(value: Any) -> torch.fx.Node | None:
    if isinstance(value, torch.fx.Node):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            found = _first_node(v)
            if found is not None:
                return found
    if isinstance(value, dict):
        return _first_node(list(value.values()))
    return None


def _shape_of(value: Any) -> Any:
    if isinstance(value, TENSOR_LIKE):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape_of(v) for v in value]
    return None


STATIC = Field((), static=True)


class _Rules:
    """One Field per node, from its inputs' Fields and the concrete argument values."""

    def __init__(self, gm: nn.Module, n_axes: int, inference: bool, *, prefix: str | None = None):
        self.gm = gm
        self.n_axes = n_axes
        self.inference = inference
        self.seen_input = False
        self.prefix = prefix  # module path of the leaf module an inner walk is inside
        self.modules: dict[str, nn.Module] | None = None
        self.calls = 0  # torch calls seen by an eager walk (names its pseudo-nodes)

    def where(self, n: torch.fx.Node) -> str | None:
        path = _module_path(n)
        if self.prefix is None:
            return path
        return f"{self.prefix}.{path}" if path else self.prefix

    # -- entry --------------------------------------------------------------------------------
    def field(self, n: Any, args, kwargs, out, getf: Callable[[Any], Any]) -> Any:
        if n.op == "placeholder":
            if not self.seen_input and isinstance(out, TENSOR_LIKE) and out.dim() == self.n_axes + 2:
                self.seen_input = True
                return Field((None, None, *(AxisMap(k, 1, 0, 0) for k in range(self.n_axes))))
            return STATIC
        if n.op in ("get_attr", "output"):
            return STATIC
        if out is None or not _has_tensor(out):
            return STATIC  # sizes, flags: no pixels
        in_fields = _collect(n.args, getf) + _collect(n.kwargs, getf)
        live = [f for f in in_fields if isinstance(f, Field) and not f.static]
        if not live:
            return _like(out, STATIC)
        try:
            result = self._dispatch(n, args, kwargs, out, getf)
        except _Unsupported as exc:
            keep = exc.keeps_layout
            if keep is None:
                keep = any(isinstance(v, TENSOR_LIKE) and isinstance(out, TENSOR_LIKE) and v.shape == out.shape
                           for v in _flat(args) + _flat(kwargs))
            result = self._unbounded(n, str(exc), out, live if keep else [], exc.lost)
        first_unbounded = next((f.unbounded for f in live if f.unbounded is not None), None)
        if first_unbounded is not None:  # an input's unbounded origin comes first, unless it only lost
            own = next((f.unbounded for f in _flat_fields(result) if isinstance(f, Field) and f.unbounded), None)
            if not (first_unbounded.lost and own is not None and not own.lost):
                result = _map_fields(result, lambda f: f if f.static else replace(f, unbounded=first_unbounded))
        return result

    def _unbounded(self, n, reason: str, out, live: list[Field], lost: bool = False) -> Any:
        where = Unbounded(n.name, self.where(n), reason, lost)
        # keep the spatial dims where the output keeps the input's layout, for the spatial tracking
        dims_from = next((f for f in live if len(f.axes()) == self.n_axes), None)

        def one(value):
            rank = value.dim()
            dims: tuple = (None,) * rank
            if dims_from is not None and len(dims_from.dims) == rank:
                dims = dims_from.dims
            return Field(dims, where)
        return _map_values(out, one)

    # -- dispatch -----------------------------------------------------------------------------
    def _dispatch(self, n, args, kwargs, out, f) -> Any:
        if n.op == "call_module":
            if self.modules is None:
                self.modules = dict(self.gm.named_modules())
            mod = self.modules[str(n.target)]
            return self._module(mod, n, args, kwargs, out, f)
        name = op_name(n.target)
        if n.target is builtins.getattr or name in _STATIC_RESULTS:
            return _like(out, STATIC)
        return self._function(name, n, args, kwargs, out, f)

    # -- modules ------------------------------------------------------------------------------
    def _module(self, mod: nn.Module, n, args, kwargs, out, f) -> Any:
        x, fx_ = args[0] if args else None, f(n.args[0]) if n.args else None
        kind = _torch_base(mod)
        tname = type(mod).__name__
        if kind is None:  # a leaf module of its own: walk its forward's graph
            return self._inner(mod, n, args, kwargs, out, f)
        if isinstance(mod, _POINTWISE_MODULES):
            return self._pointwise(n, [(fx_, x)], out)
        if isinstance(mod, nn.modules.conv._ConvNd):
            nd = len(mod.kernel_size)
            if mod.padding_mode == "circular":
                raise _Unsupported(f"{tname} with circular padding reads the opposite border")
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                return self._conv_transpose(fx_, x, out, nd, mod.kernel_size, mod.stride, mod.padding, mod.dilation)
            return self._conv(fx_, x, out, nd, mod.kernel_size, mod.stride, mod.padding, mod.dilation)
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            nd = _pool_nd(mod)
            return self._conv(fx_, x, out, nd, mod.kernel_size, mod.stride or mod.kernel_size, mod.padding,
                              mod.dilation, channels_contracted=False)
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            nd = _pool_nd(mod)
            return self._conv(fx_, x, out, nd, mod.kernel_size, mod.stride or mod.kernel_size, mod.padding, 1,
                              channels_contracted=False)
        if isinstance(mod, (nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)):
            nd = _pool_nd(mod)
            return self._conv(fx_, x, out, nd, mod.kernel_size, mod.stride or mod.kernel_size, 0, 1,
                              channels_contracted=False)
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                            nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return self._adaptive(fx_, x, out, mod.output_size, tname, _pool_nd(mod))
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if (mod.training and not self.inference) or mod.running_mean is None:
                raise _Unsupported(f"{tname} in training mode normalises with statistics over the batch and H, W "
                                   "(call model.eval())", keeps_layout=True)
            return self._pointwise(n, [(fx_, x)], out)
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
            if mod.track_running_stats and (self.inference or not mod.training):
                return self._pointwise(n, [(fx_, x)], out)
            raise _Unsupported(f"{tname} normalises with statistics over H, W (global context)", keeps_layout=True)
        if isinstance(mod, nn.GroupNorm):
            raise _Unsupported("GroupNorm normalises with statistics over H, W (global context)", keeps_layout=True)
        if isinstance(mod, nn.LocalResponseNorm):
            return self._pointwise(n, [(fx_, x)], out)
        if isinstance(mod, nn.LayerNorm):
            return self._norm_last(fx_, x, out, len(mod.normalized_shape), "LayerNorm")
        if isinstance(mod, nn.Linear):
            return self._last_dim(fx_, x, out, "Linear")
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self._softmax(fx_, x, out, mod.dim, tname)
        if isinstance(mod, nn.Upsample):
            fixed = mod.size is not None
            return self._resize(fx_, x, out, mod.mode, mod.scale_factor, mod.align_corners,
                                mod.recompute_scale_factor, False, fixed)
        if isinstance(mod, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                            nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                            nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)):
            return self._pad(fx_, x, out, mod.padding, "constant")
        if isinstance(mod, (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)):
            raise _Unsupported("circular padding reads the opposite border")
        if isinstance(mod, nn.PixelShuffle):
            return self._pixel_shuffle(fx_, x, out, mod.upscale_factor, up=True)
        if isinstance(mod, nn.PixelUnshuffle):
            return self._pixel_shuffle(fx_, x, out, mod.downscale_factor, up=False)
        if isinstance(mod, nn.Flatten):
            return self._reshape(fx_, x, out)
        if isinstance(mod, nn.Unflatten):
            return self._reshape(fx_, x, out)
        if isinstance(mod, nn.MultiheadAttention):
            raise _Unsupported("attention over all positions (global mixing)")
        raise _Unsupported(f"no receptive-field rule for {tname}")

    def _inner(self, mod: nn.Module, n, args, kwargs, out, f) -> Any:
        """A leaf module (timm's BatchNormAct2d, a user's `--leaf`) is still made of ops: run its
        forward on meta tensors under a function mode that applies the same rules per torch call."""
        prefix = _module_path(n) or n.name
        values = list(args) + list(kwargs.values())
        seeds = [f(a) for a in n.args] + [f(a) for a in n.kwargs.values()]
        live = [(i, sd) for i, sd in enumerate(seeds) if isinstance(sd, Field) and not sd.static]
        key = _config_key(mod)
        if key is None or len(live) != 1 or len(live[0][1].axes()) != self.n_axes:
            return _eager_walk(mod, args, kwargs, seeds, _Rules(mod, self.n_axes, self.inference, prefix=prefix))
        # One input carrying the whole map: walk once per configuration and input shape with
        # identity maps, then compose that relative result onto the actual input's maps.
        i, seed = live[0]
        shape_key = tuple(tuple(int(d) for d in v.shape) if isinstance(v, TENSOR_LIKE) else v
                          for v in values if isinstance(v, (TENSOR_LIKE, int, float, bool, str, type(None))))
        layout = tuple(m.axis if m is not None else None for m in seed.dims)
        rel_key = (key, shape_key, layout, self.inference)
        if len(_INNER_RESULTS) > _INNER_LIMIT:
            _INNER_RESULTS.clear()
        if rel_key not in _INNER_RESULTS:
            identity = Field(tuple(AxisMap(m.axis, 1, 0, 0) if m is not None else None for m in seed.dims))
            rel_seeds = [identity if j == i else sd for j, sd in enumerate(seeds)]
            _INNER_RESULTS[rel_key] = _eager_walk(mod, args, kwargs, rel_seeds,
                                                  _Rules(mod, self.n_axes, self.inference))
        return _map_fields(_INNER_RESULTS[rel_key], lambda rel: _compose(seed, rel, n.name, prefix))

    # -- functions and methods -----------------------------------------------------------------
    def _function(self, name: str, n, args, kwargs, out, f) -> Any:
        a0 = args[0] if args else None
        f0 = f(n.args[0]) if n.args else None
        if name == "getitem":
            return self._getitem(f0, a0, args[1], out)
        if name in _IDENTITY_VIEWS:
            return self._pointwise(n, [(f0, a0)], out)
        if name in _REDUCTIONS and not (len(args) > 1 and isinstance(args[1], TENSOR_LIKE)):
            return self._reduce(name, f0, a0, args, kwargs, out)
        if name in ("softmax", "log_softmax", "softmin"):
            return self._softmax(f0, a0, out, _arg(args, kwargs, 1, "dim"), name)
        if name in ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"):
            return self._conv_call(name, f0, a0, args, kwargs, out)
        if name.startswith(("max_pool", "avg_pool")) and name[-2:] in ("1d", "2d", "3d"):
            nd = int(name[-2])
            k = _arg(args, kwargs, 1, "kernel_size")
            s = _arg(args, kwargs, 2, "stride") or k
            p = _arg(args, kwargs, 3, "padding", 0)
            d = _arg(args, kwargs, 4, "dilation", 1) if name.startswith("max") else 1
            return self._conv(f0, a0, out, nd, k, s, p, d, channels_contracted=False)
        if name.startswith("lp_pool") and name[-2:] in ("1d", "2d", "3d"):
            k = _arg(args, kwargs, 2, "kernel_size")
            return self._conv(f0, a0, out, int(name[-2]), k, _arg(args, kwargs, 3, "stride") or k, 0, 1,
                              channels_contracted=False)
        if name.startswith("adaptive_") and "pool" in name:
            return self._adaptive(f0, a0, out, _arg(args, kwargs, 1, "output_size"), name,
                                  int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else a0.dim() - 2)
        if name in ("interpolate", "upsample"):
            size_arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("size")
            fixed = size_arg is not None and not _mentions_node(size_arg)
            return self._resize(f0, a0, out, _arg(args, kwargs, 3, "mode", "nearest"),
                                _arg(args, kwargs, 2, "scale_factor"), _arg(args, kwargs, 4, "align_corners"),
                                _arg(args, kwargs, 5, "recompute_scale_factor"), _arg(args, kwargs, 6, "antialias",
                                                                                       False), fixed)
        if name.startswith("upsample_"):
            mode = name.removeprefix("upsample_")[:-2]
            align = _arg(args, kwargs, 2, "align_corners") if mode != "nearest" and mode != "nearest_exact" else None
            mode = {"nearest_exact": "nearest-exact"}.get(mode, mode)
            return self._resize(f0, a0, out, mode, None, align, None, False, False)
        if name == "pad":
            return self._pad(f0, a0, out, _arg(args, kwargs, 1, "pad"), _arg(args, kwargs, 2, "mode", "constant"),
                             torch_order=True)
        if name == "constant_pad_nd":
            return self._pad(f0, a0, out, _arg(args, kwargs, 1, "pad"), "constant", torch_order=True)
        if name.startswith(("reflection_pad", "replication_pad")):
            return self._pad(f0, a0, out, _arg(args, kwargs, 1, "padding"), "constant", torch_order=True)
        if name == "batch_norm" and "no_training" in str(n.target):  # aten's eval-mode kernel
            return self._pointwise(n, [(f0, a0)], out)
        if name in ("batch_norm", "batch_norm_no_stats"):
            training = _arg(args, kwargs, 5, "training", False)
            if name == "batch_norm_no_stats" or (training and not self.inference) or _arg(args, kwargs, 1,
                                                                                          "running_mean") is None:
                raise _Unsupported("batch_norm with batch statistics normalises over the batch and H, W "
                                   "(call model.eval())", keeps_layout=True)
            return self._pointwise(n, [(f0, a0)], out)
        if name == "instance_norm":
            if _arg(args, kwargs, 5, "use_input_stats", True):
                raise _Unsupported("instance_norm normalises with statistics over H, W (global context)",
                                   keeps_layout=True)
            return self._pointwise(n, [(f0, a0)], out)
        if name == "group_norm":
            raise _Unsupported("group_norm normalises with statistics over H, W (global context)", keeps_layout=True)
        if name in ("layer_norm", "rms_norm"):
            ns = _arg(args, kwargs, 1, "normalized_shape")
            return self._norm_last(f0, a0, out, len(ns) if isinstance(ns, (list, tuple, torch.Size)) else 1, name)
        if name == "local_response_norm":
            return self._pointwise(n, [(f0, a0)], out)
        if name == "linear":
            return self._last_dim(f0, a0, out, "linear")
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            return self._cat(name, n, args, kwargs, out, f)
        if name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
                    "unsafe_view", "expand", "expand_as", "broadcast_to"):
            return self._reshape(f0, a0, out)
        if name in ("permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "numpy_T"):
            return self._permute(name, f0, a0, args, kwargs, out)
        if name in ("split", "chunk", "unbind", "tensor_split", "split_with_sizes", "unsafe_split"):
            return self._split(name, f0, a0, args, kwargs, out)
        if name in ("pixel_shuffle", "pixel_unshuffle"):
            return self._pixel_shuffle(f0, a0, out, int(args[1]), up=name == "pixel_shuffle")
        if name in ("scaled_dot_product_attention", "multi_head_attention_forward"):
            raise _Unsupported("attention over all positions (global mixing)")
        if name in ("matmul", "mm", "bmm", "einsum", "baddbmm", "addmm"):
            return self._matmul(name, n, args, out, f)
        if is_pointwise(name):
            tensors = [(f(a), v) for a, v in zip(_flat(n.args) + _flat(n.kwargs), _flat(args) + _flat(kwargs))
                       if isinstance(v, TENSOR_LIKE)]
            return self._pointwise(n, tensors, out)
        raise _Unsupported(f"no receptive-field rule for {name}")

    # -- rules --------------------------------------------------------------------------------
    def _pointwise(self, n, tensors: list[tuple[Field | None, Any]], out) -> Any:
        """Elementwise with broadcasting: the union of the inputs' maps (max over paths)."""
        if not isinstance(out, TENSOR_LIKE):
            raise _Unsupported(f"no receptive-field rule for {op_name(n.target)} returning {type(out).__name__}")
        rank = out.dim()
        dims: list[AxisMap | None] = [None] * rank
        for fld, value in tensors:
            if not isinstance(fld, Field) or fld.static or not isinstance(value, TENSOR_LIKE):
                continue
            offset = rank - len(fld.dims)
            for k, m in enumerate(fld.dims):
                if m is None:
                    continue
                d = offset + k
                if d < 0 or (value.shape[k] == 1 and out.shape[d] != 1):
                    raise _Unsupported("broadcasts a one-pixel-wide map along a spatial axis")
                dims[d] = m if dims[d] is None else _union(dims[d], m)
        return Field(tuple(dims))

    def _spatial_dims(self, fld: Field, x, nd: int, what: str, channels_contracted: bool = True) -> list[int]:
        """The last `nd` dims of x, which a conv/pool slides over; a contracted channel dim must
        not carry a spatial axis (Mixer's tokens-as-channels conv mixes all positions)."""
        rank = x.dim()
        dims = list(range(rank - nd, rank))
        if channels_contracted and rank - nd - 1 >= 0 and fld.dims[rank - nd - 1] is not None:
            raise _Unsupported(f"{what} contracts a spatial axis as its channels (a fixed-size weight over positions)")
        return dims

    def _conv(self, fld, x, out, nd, k, s, p, d, channels_contracted: bool = True) -> Field:
        k, s, d = _tuple(k, nd), _tuple(s, nd), _tuple(d, nd)
        if isinstance(p, str):
            p = tuple(0 for _ in k) if p == "valid" else tuple((di * (ki - 1)) // 2 for ki, di in zip(k, d))
        p = _tuple(p, nd)
        dims = list(fld.dims)
        if len(dims) != x.dim() or out.dim() != x.dim():
            raise _Unsupported("no receptive-field rule for a convolution that changes the rank")
        for j, dim in enumerate(self._spatial_dims(fld, x, nd, "convolution", channels_contracted)):
            if dims[dim] is not None:
                dims[dim] = dims[dim].then(s[j], -p[j], -p[j] + (k[j] - 1) * d[j])
        if channels_contracted:
            dims[x.dim() - nd - 1] = None
        return Field(tuple(dims))

    def _conv_transpose(self, fld, x, out, nd, k, s, p, d) -> Field:
        k, s, p, d = _tuple(k, nd), _tuple(s, nd), _tuple(p, nd), _tuple(d, nd)
        dims = list(fld.dims)
        for j, dim in enumerate(self._spatial_dims(fld, x, nd, "transposed convolution")):
            if dims[dim] is not None:
                # y[i] sums x[m] over taps t with i = s*m - p + d*t
                dims[dim] = dims[dim].then(Fraction(1, s[j]), Fraction(p[j] - d[j] * (k[j] - 1), s[j]),
                                           Fraction(p[j], s[j]), ceil_lo=True)
        dims[x.dim() - nd - 1] = None
        return Field(tuple(dims))

    def _conv_call(self, name, fld, x, args, kwargs, out) -> Field:
        w = _arg(args, kwargs, 1, "weight")
        nd = w.dim() - 2
        k = tuple(int(v) for v in w.shape[2:])
        if name == "convolution":
            s, p, d, transposed = args[3], args[4], args[5], args[6]
        elif name.startswith("conv_transpose"):
            s, p, d, transposed = (_arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
                                   _arg(args, kwargs, 7, "dilation", 1), True)
        else:
            s, p, d, transposed = (_arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
                                   _arg(args, kwargs, 5, "dilation", 1), False)
        if transposed:
            return self._conv_transpose(fld, x, out, nd, k, s, p, d)
        return self._conv(fld, x, out, nd, k, s, p, d)

    def _adaptive(self, fld, x, out, output_size, what, nd: int) -> Field:
        """An adaptive pool keeps an axis only where its output size is None (the input's)."""
        sizes = list(output_size) if isinstance(output_size, (list, tuple)) else [output_size] * nd
        rank = x.dim()
        dims = list(fld.dims)
        for j, dim in enumerate(range(rank - nd, rank)):
            size = sizes[j]
            if dims[dim] is None or size is None:
                continue
            if int(size) == 1:
                raise _Unsupported(f"{what} to 1: global pooling over the whole map", keeps_layout=False)
            raise _Unsupported(f"{what} to a fixed {size}-wide grid: its windows grow with the input",
                               keeps_layout=False)
        return Field(tuple(dims))

    def _resize(self, fld, x, out, mode, scale_factor, align_corners, recompute, antialias, fixed) -> Field:
        if fixed:
            raise _Unsupported("resizes to a fixed size: the scale depends on the input size")
        nd = out.dim() - 2
        dims = list(fld.dims)
        scales = _tuple_or_none(scale_factor, nd)
        for j, dim in enumerate(range(2, out.dim())):
            m = dims[dim]
            if m is None:
                continue
            n_in, n_out = int(x.shape[dim]), int(out.shape[dim])
            if scales is not None and not recompute:
                ratio = Fraction(scales[j]).limit_denominator(1 << 16)
                if abs(float(ratio) - scales[j]) > 1e-12 or n_out != math.floor(n_in * scales[j]):
                    raise _Unsupported(f"resize by {scales[j]}: no exact rational scale")
            else:
                ratio = Fraction(n_out, n_in)
            s = 1 / ratio  # input pixels per output pixel
            if mode in ("linear", "bilinear", "trilinear", "bicubic") and align_corners:
                raise _Unsupported(f"{mode} resize with align_corners=True: which input an output reads depends on "
                                   "the whole input size ((n_in-1)/(n_out-1))")
            if antialias and s > 1:
                raise _Unsupported(f"no receptive-field rule for an antialiased {mode} downsampling")
            c = s / 2 - Fraction(1, 2)  # source coordinate of output 0 (half-pixel centres)
            if mode == "nearest":
                lo, hi = Fraction(0), Fraction(0)  # floor(s*j)
            elif mode == "nearest-exact":
                lo, hi = s / 2, s / 2  # floor(s*(j + 1/2))
            elif mode in ("linear", "bilinear", "trilinear"):
                lo, hi = c, c + 1  # floor(x) and floor(x) + 1
            elif mode == "bicubic":
                lo, hi = c - 1, c + 2
            elif mode == "area":  # adaptive average: [floor(s*j), ceil(s*(j+1)) - 1]
                lo, hi = Fraction(0), s - Fraction(1, s.denominator)
            else:
                raise _Unsupported(f"no receptive-field rule for {mode} resizing")
            dims[dim] = m.then(s, lo, hi)
        return Field(tuple(dims))

    def _pad(self, fld, x, out, pad, mode, torch_order: bool = False) -> Field:
        if mode == "circular":
            raise _Unsupported("circular padding reads the opposite border")
        if mode not in ("constant", "reflect", "replicate"):
            raise _Unsupported(f"no receptive-field rule for {mode} padding")
        rank = x.dim()
        if isinstance(pad, int):
            nd = rank - 2
            pad = (pad,) * (2 * nd)
        pad = tuple(int(v) for v in pad)
        dims = list(fld.dims)
        for j in range(len(pad) // 2):
            dim = rank - 1 - j
            left = pad[2 * j]
            if dims[dim] is not None:
                dims[dim] = dims[dim].then(1, -left, -left)
        return Field(tuple(dims))

    def _pixel_shuffle(self, fld, x, out, r, up: bool) -> Field:
        dims = list(fld.dims)
        rank = x.dim()
        if dims[rank - 3] is not None:
            raise _Unsupported("pixel shuffle of a spatial channel dim")
        for dim in (rank - 2, rank - 1):
            if dims[dim] is not None:
                dims[dim] = dims[dim].then(Fraction(1, r), 0, 0) if up \
                    else dims[dim].then(r, 0, r - 1)
        return Field(tuple(dims))

    def _norm_last(self, fld, x, out, k: int, what: str) -> Field:
        if any(m is not None for m in fld.dims[len(fld.dims) - k:]):
            raise _Unsupported(f"{what} normalises with statistics over H, W (global context)", keeps_layout=True)
        return Field(fld.dims)

    def _last_dim(self, fld, x, out, what: str) -> Field:
        if fld.dims and fld.dims[-1] is not None:
            raise _Unsupported(f"{what} along a spatial axis: a fixed-size weight over positions")
        return Field(fld.dims)

    def _softmax(self, fld, x, out, dim, what) -> Field:
        if dim is None:
            raise _Unsupported(f"{what} over an implicit dim")
        if fld.dims[int(dim) % x.dim()] is not None:
            raise _Unsupported(f"{what} along a spatial axis: normalises over all positions", keeps_layout=True)
        return Field(fld.dims)

    def _reduce(self, name, fld, x, args, kwargs, out) -> Any:
        dim = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        if name in ("std", "var", "std_mean", "var_mean") and isinstance(dim, bool):
            dim = None
        rank = x.dim()
        reduced = set(range(rank)) if dim is None or dim == () or dim == [] else \
            {int(d) % rank for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        hit = [fld.dims[d] for d in reduced if fld.dims[d] is not None]
        if hit:
            raise _Unsupported(f"{name} over {_axes_text(hit, self.n_axes)}: global pooling over the whole map",
                               keeps_layout=False)
        dims = [m for d, m in enumerate(fld.dims) if keepdim or d not in reduced]
        if keepdim:
            dims = [None if d in reduced else m for d, m in enumerate(fld.dims)]
        result = Field(tuple(dims))
        return _like(out, result)

    def _cat(self, name, n, args, kwargs, out, f) -> Field:
        tensors_arg = n.args[0] if n.args else n.kwargs.get("tensors")
        values = args[0] if args else kwargs.get("tensors")
        fields_in = [f(a) for a in tensors_arg]
        dim = int(_arg(args, kwargs, 1, "dim", 0))
        if name in ("hstack", "vstack"):
            raise _Unsupported(f"no receptive-field rule for {name}")
        rank = out.dim()
        dim %= rank
        dims: list[AxisMap | None] = [None] * rank
        for fld, v in zip(fields_in, values):
            if not isinstance(fld, Field) or fld.static:
                continue
            src = list(fld.dims)
            if name == "stack":
                src.insert(dim, None)
            if len(src) != rank:
                raise _Unsupported(f"no receptive-field rule for {name} of tensors of rank {len(src)}")
            if src[dim] is not None:
                raise _Unsupported(f"{name} along a spatial axis")
            for d, m in enumerate(src):
                if m is not None:
                    dims[d] = m if dims[d] is None else _union(dims[d], m)
        return Field(tuple(dims))

    def _reshape(self, fld, x, out) -> Field:
        in_shape = [int(v) for v in x.shape]
        out_shape = [int(v) for v in out.shape]
        return Field(tuple(_regroup(in_shape, list(fld.dims), out_shape)))

    def _permute(self, name, fld, x, args, kwargs, out) -> Field:
        rank = x.dim()
        dims = list(fld.dims)
        if name == "permute":
            order = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            order = order or kwargs.get("dims")
            return Field(tuple(dims[int(d) % rank] for d in order))
        if name in ("t", "numpy_T"):
            return Field(tuple(reversed(dims)))
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = int(_arg(args, kwargs, 1, "dim0")) % rank, int(_arg(args, kwargs, 2, "dim1")) % rank
            dims[a], dims[b] = dims[b], dims[a]
            return Field(tuple(dims))
        src = _arg(args, kwargs, 1, "source")
        dst = _arg(args, kwargs, 2, "destination")
        src = [int(s) % rank for s in (src if isinstance(src, (list, tuple)) else [src])]
        dst = [int(d) % rank for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
        order = [d for d in range(rank) if d not in src]
        for s_, d_ in sorted(zip(dst, src)):
            order.insert(s_, d_)
        return Field(tuple(dims[d] for d in order))

    def _split(self, name, fld, x, args, kwargs, out) -> Any:
        rank = x.dim()
        default_dim = 0
        dim = int(_arg(args, kwargs, 1 if name == "unbind" else 2, "dim", default_dim)) % rank
        if fld.dims[dim] is not None:
            raise _Unsupported(f"{name} along a spatial axis")
        if name == "unbind":
            dims = tuple(m for d, m in enumerate(fld.dims) if d != dim)
            return [Field(dims) for _ in out]
        return [Field(fld.dims) for _ in out]

    def _getitem(self, fld, value, index, out) -> Any:
        if isinstance(fld, list):
            return fld[index] if isinstance(index, int) else fld[index]
        if not isinstance(fld, Field) or not isinstance(value, TENSOR_LIKE):
            raise _Unsupported("no receptive-field rule for this indexing")
        idx = index if isinstance(index, tuple) else (index,)
        rank = value.dim()
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in idx:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (rank - n_real))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (rank - sum(1 for i in expanded if i is not None)))
        dims: list[AxisMap | None] = []
        d = 0
        for i in expanded:
            if i is None:
                dims.append(None)
                continue
            m = fld.dims[d]
            size = int(value.shape[d])
            if isinstance(i, slice):
                start, _, step = slice(*(int(v) if v is not None else None for v in (i.start, i.stop, i.step))
                                       ).indices(size)
                if m is not None and (step != 1 or start != 0 or i.stop is not None):
                    if step <= 0:
                        raise _Unsupported("reversed slicing of a spatial axis")
                    m = m.then(step, start, start)
                dims.append(m)
            elif isinstance(i, (int, torch.SymInt)):
                if m is not None:
                    raise _Unsupported("selects one position of a spatial axis (not translation-equivariant)")
            else:
                if m is not None:
                    raise _Unsupported("tensor indexing of a spatial axis", lost=True)
                dims.append(None)
            d += 1
        if len(dims) != out.dim():
            raise _Unsupported("no receptive-field rule for this indexing")
        return Field(tuple(dims))

    def _matmul(self, name, n, args, out, f) -> Field:
        if name == "einsum" or name in ("baddbmm", "addmm"):
            live = [a for a in n.args if isinstance(a, torch.fx.Node) and not f(a).static]
            raise _Unsupported("matmul of two activations: every position mixes with every other"
                               if len(live) > 1 else f"no receptive-field rule for {name}")
        fa, fb = f(n.args[0]), f(n.args[1])
        a, b = args[0], args[1]
        if not fa.static and not fb.static:
            raise _Unsupported("matmul of two activations: every position mixes with every other (global attention)")
        if fb.static:  # x @ W: rows independent, the last dim contracted
            if fa.dims[-1] is not None:
                raise _Unsupported("matmul along a spatial axis: a fixed-size weight over positions")
            if b.dim() < 2 or out.dim() != a.dim():
                raise _Unsupported(f"no receptive-field rule for {name} of these ranks")
            return Field(tuple(fa.dims[:-1]) + (None,))
        if b.dim() < 2 or out.dim() != b.dim() or fb.dims[-2] is not None:
            raise _Unsupported("matmul along a spatial axis: a fixed-size weight over positions")
        return Field(tuple(fb.dims[:-2]) + (None, fb.dims[-1]))


# ----------------------------------------------------------------------------- helpers
_BASES: dict[type, type | None] = {}


def _torch_base(mod: nn.Module) -> type | None:
    """The torch.nn class whose forward this module runs, or None when a class outside torch.nn
    overrides forward (its behaviour is its own: no rule)."""
    t = type(mod)
    if t not in _BASES:
        _BASES[t] = _find_base(t)
    return _BASES[t]


def _find_base(t: type) -> type | None:
    mod = t
    for cls in t.__mro__:
        if cls.__module__.startswith("torch.nn.modules"):
            return cls if mod.forward is cls.forward else None
        if "forward" in vars(cls):
            return None
    return None


def _pool_nd(mod: nn.Module) -> int:
    """1, 2 or 3, from the torch.nn class it is (MaxPool2d -> 2)."""
    return next(int(c.__name__[-2]) for c in type(mod).__mro__ if c.__name__[-2:] in ("1d", "2d", "3d"))


def _tuple_or_none(v: Any, n: int) -> tuple[float, ...] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(float(x) for x in v) if len(v) == n else tuple(float(v[0]) for _ in range(n))
    return (float(v),) * n


def _union(a: AxisMap, b: AxisMap) -> AxisMap:
    if a.axis != b.axis:
        raise _Unsupported("combines different spatial axes of the input position by position")
    if a.stride != b.stride:
        raise _Unsupported(f"combines maps of different strides ({_number(a.stride)} and {_number(b.stride)}) "
                           "position by position")
    return AxisMap(a.axis, a.stride, min(a.lo, b.lo), max(a.hi, b.hi), math.lcm(a.align, b.align),
                   ((a, _IDENTITY_EDGE), (b, _IDENTITY_EDGE)), a.fractional or b.fractional)


def _regroup(in_shape: list[int], in_dims: list[AxisMap | None], out_shape: list[int]) -> list[AxisMap | None]:
    """A reshape keeps a spatial dim only where it maps one-to-one onto an output dim of the same
    size (dims of size 1 come and go freely); merging or splitting a spatial axis has no rule."""
    out: list[AxisMap | None] = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1 and in_dims[i] is None:
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1 and not (i < len(in_shape) and in_shape[i] == 1):
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            if any(in_dims[k] is not None for k in range(i, len(in_shape))):
                raise _Unsupported("reshape drops a spatial axis", lost=True)
            break
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                gi.append(i)
                pi *= in_shape[i]
                i += 1
            elif j < len(out_shape):
                gj.append(j)
                pj *= out_shape[j]
                j += 1
            else:
                raise _Unsupported("no receptive-field rule for this reshape")
        spatial = [in_dims[k] for k in gi if in_dims[k] is not None]
        if not spatial:
            continue
        if len(gi) == 1 and len(gj) == 1:
            out[gj[0]] = in_dims[gi[0]]
        else:
            raise _Unsupported("reshape merges or splits a spatial axis (positions leave their grid)", lost=True)
    return out


def _axes_text(maps: list[AxisMap], n_axes: int) -> str:
    from mixfx.shapes import spatial_symbol_names

    names = spatial_symbol_names(n_axes + 2)
    return ", ".join(dict.fromkeys(names[m.axis] for m in sorted(maps, key=lambda m: m.axis)))


def _has_tensor(value: Any) -> bool:
    if isinstance(value, TENSOR_LIKE):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _collect(value: Any, getf: Callable[[Any], Any]) -> list[Any]:
    """The fields of every value inside `value` (fx nodes, or tensors in an eager walk)."""
    out: list[Any] = []

    def walk(v):
        if isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, slice):
            walk((v.start, v.stop, v.step))
        else:
            fv = getf(v)
            out.extend(_flat_fields(fv) if isinstance(fv, list) else [fv])
    walk(value)
    return out


def _flat_fields(v: Any) -> list[Any]:
    if isinstance(v, list):
        return [x for item in v for x in _flat_fields(item)]
    return [v]


def _field_of(a: Any, fields: dict[str, Any]) -> Any:
    if isinstance(a, torch.fx.Node):
        return fields.get(a.name, STATIC)
    if isinstance(a, (list, tuple)):
        return [_field_of(x, fields) for x in a]
    return STATIC


def _flat(v: Any) -> list[Any]:
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flat(item)]
    return [v]


def _mentions_node(v: Any) -> bool:
    if isinstance(v, torch.fx.Node):
        return True
    if isinstance(v, (list, tuple)):
        return any(_mentions_node(x) for x in v)
    return False


def _like(out: Any, fld: Field) -> Any:
    """`fld` for a tensor output, one per tensor of a tuple output (static fields keep the rank)."""
    if isinstance(out, TENSOR_LIKE):
        if fld.static:
            return Field((None,) * out.dim(), static=True)
        return fld
    if isinstance(out, (tuple, list)):
        return [_like(v, fld) for v in out]
    return STATIC


def _map_values(out: Any, fn: Callable[[Any], Field]) -> Any:
    if isinstance(out, TENSOR_LIKE):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return [_map_values(v, fn) for v in out]
    return STATIC


def _map_fields(value: Any, fn: Callable[[Field], Field]) -> Any:
    if isinstance(value, Field):
        return fn(value)
    if isinstance(value, list):
        return [_map_fields(v, fn) for v in value]
    return value


# ----------------------------------------------------------------------------- report hook-in
def attach_receptive_fields(report: Any, gm: torch.fx.GraphModule) -> None:
    """Fill `report.receptive_field`, `report.tileable` and each `NodeInfo.receptive_field`
    (called once at the end of `mixfx.analyze`). Never raises: a walk that cannot run leaves the
    fields empty and says why in the notes."""
    try:
        run = compute_fields(gm, report.input_shape)
    except Exception as exc:  # noqa: BLE001 - the verdict stands without it
        report.notes.append(f"Receptive field not computed: the meta run failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).")
        return
    varying = {info.name for info in report.nodes if info.depends_on}  # the analysis' own concrete runs
    for info in report.nodes:
        info.receptive_field = run.receptive_field(info.name, info.name in varying)
    head = getattr(report, "head", None)
    target = None
    if head is not None:  # the head's spatial input: the map it pools
        gm_nodes = {n.name: n for n in gm.graph.nodes}
        node = gm_nodes.get(head.node)
        if node is not None:
            target = next((a.name for a in node.all_input_nodes if a.name in varying or run.is_spatial(a.name)), None)
    target = target or run.pre_head(varying)
    report.receptive_field = run.receptive_field(target, target in varying) if target is not None else None
    rf = report.receptive_field
    report.tileable = bool(rf is not None and rf.bounded and not report.global_mixing
                           and not getattr(report, "global_context", []))


def summary_line(rf: ReceptiveField | None, tileable: bool) -> str | None:
    """`receptive field 427x427 px, stride 32 (tileable, halo 213 px)` for the CLI."""
    if rf is None:
        return None
    if not rf.bounded:
        return f"receptive field unbounded at `{rf.unbounded_at}`: {rf.reason} (not tileable)"
    size = "x".join(str(s) for s in rf.size)
    strides = list(dict.fromkeys(rf.stride))
    stride = "x".join(_fmt(s) for s in rf.stride) if len(strides) > 1 else _fmt(strides[0])
    halo = max(halo_px(rf))
    state = f"tileable, halo {halo} px" if tileable else "not tileable: global context or mixing"
    return f"receptive field {size} px, stride {stride} ({state})"


def short_text(rf: ReceptiveField | None) -> str:
    """One node's field in a narrow table cell: `427/32` (size/stride, one figure when every axis
    agrees), `∞` when unbounded, or empty."""
    if rf is None:
        return ""
    if not rf.bounded:
        return "\u221e"
    return "x".join(dict.fromkeys(str(v) for v in rf.size)) + "/" + "x".join(dict.fromkeys(_fmt(v) for v in rf.stride))


def halo_px(rf: ReceptiveField) -> list[int]:
    """Per axis, the input pixels a tile needs beyond the pixels its outputs own: half the field."""
    return [max(0, math.ceil((s - 1) / 2)) for s in rf.size]


def _fmt(x: int | float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


__all__ = ["AxisMap", "Field", "FieldRun", "Unbounded", "compute_fields", "attach_receptive_fields", "summary_line",
           "to_receptive_field", "halo_px", "op_name", "short_text"]
