"""Locality by spatial extent: global mixing, global context and constant-size resizes, judged on
every torch call the eager forward executes.

`record_ops` runs the eager model on meta tensors (no compute) under a `TorchFunctionMode` that
sees every torch function and Tensor method call, inside fx leaf modules, autowrapped functions
and code torch.export specialised too; global module hooks give each call its module path (and
let built-in modules that the shape shortcuts answer be judged as one op). Each tensor carries a
`layout` (which input positions each of its dims covers, `mixfx.analysis.layout`). Ops that
combine positions log an `Event` with the extent of the dims they combine.

`judge` compares the events of two runs at different input sizes: an op whose combined extent
differs between them reaches further when the input grows. Then:
- attention (any form), a matmul/einsum of two activations, a sum over positions of the product
  of two activations (attention pooling), an FFT, a scan or recurrence over such an extent is
  *global mixing*;
- a mean/max/adaptive-pool summary over it that is broadcast back onto the map, an adaptive pool
  to a fixed grid of cells whose result is used on the map again (pyramid pooling, a query pooled
  to the window grid), and a norm whose statistics span it (GroupNorm/InstanceNorm/LayerNorm over
  H, W), is *global context*;
- a resize whose output size does not change with the input, followed by spatial processing, is
  a rigid node of kind "resized".
With one run only (no other size runs: a fixed model), an extent that covers a whole input axis
counts as growing.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mixfx.analysis import layout as L
from mixfx.analysis.nodes import global_module_hooks
from mixfx.shape_rules import TENSOR_LIKE



@dataclass
class Event:
    kind: str  # mixing | summary | norm | broadcast | resize | gridpool
    module: str
    op: str
    extent: dict[int, float]
    length: int
    detail: str = ""
    source: tuple | None = None  # broadcast: the summary's key
    out_sizes: tuple = ()  # resize: output spatial sizes
    in_sizes: tuple = ()
    followed: bool = False  # resize, gridpool: spatial processing after it
    rejoined: bool = False  # gridpool: the grid met the map again (an add, a cat, a matmul with it)
    from_grids: frozenset = frozenset()  # resize: the grid pools its input comes from
    key: tuple = ()
    function: str = ""  # the model's function that made the call
    index: int = 0  # how many events of this op in this module came before


@dataclass
class OpLog:
    input_shape: tuple[int, ...]
    events: list[Event] = field(default_factory=list)
    error: str | None = None
    calls: int = 0
    # ops that turned a map of positions into vectors, as (call number, module, op, index), and
    # the call number of the last op whose output still had positions: the head is the first end
    # after it (where positions stop being treated as positions)
    ends: list[tuple[int, str, str, int]] = field(default_factory=list)
    last_positional: int = -1
    step: int = 0

    def head(self) -> tuple[str, str, int] | None:
        after = [e for e in self.ends if e[0] >= self.last_positional]
        return after[0][1:] if after else None


def _call_site() -> tuple[str, int, str]:
    """The first frame outside torch and mixfx: where the model's code made this call (file,
    line, function)."""
    import sys

    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/torch/" not in name and "/mixfx/" not in name and "contextlib" not in name:
            return name, f.f_lineno, f.f_code.co_name
        f = f.f_back
    return "", 0, ""


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    return name.lstrip("_").rstrip("_") if name.startswith("__") else name


_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "nansum",
               "nanmean", "std_mean", "var_mean", "median", "argmax", "argmin", "all", "any"}
_WEIGHTED_SUMS = {"sum", "mean", "nansum", "nanmean"}
_VECTOR_NORMS = {"norm", "linalg_vector_norm", "vector_norm", "frobenius_norm"}
_SCANS = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp"}
_VIEWS = {"view", "reshape", "_unsafe_view", "view_as", "reshape_as", "flatten", "unflatten"}
_PERMUTES = {"permute", "transpose", "swapaxes", "swapdims", "t", "movedim", "moveaxis"}
_MATMULS = {"matmul", "bmm", "baddbmm", "mm", "addmm"}
_FFTS = {"fft_fft", "fft_ifft", "fft_rfft", "fft_irfft", "fft_fft2", "fft_ifft2", "fft_rfft2", "fft_irfft2",
         "fft_fftn", "fft_ifftn", "fft_rfftn", "fft_irfftn", "fft_hfft", "fft_ihfft", "stft"}
_NORMS = {"group_norm": "GroupNorm", "instance_norm": "InstanceNorm", "layer_norm": "LayerNorm"}
_POOLS = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
          "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2, "lp_pool2d": 2}
_ADAPTIVE = {"adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
             "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "adaptive_max_pool2d_with_indices": 2}
_CONVS = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_FACTORIES = {"new_empty", "new_empty_strided", "empty", "empty_like", "empty_strided", "new_zeros", "new_ones",
              "zeros", "ones", "zeros_like", "ones_like"}


def _tup(v: Any, n: int) -> tuple:
    if isinstance(v, (tuple, list)):
        return tuple(v) if len(v) == n else tuple(v[:1]) * n
    return (v,) * n


class _Recorder(TorchFunctionMode):
    """Tracks a layout per tensor (by id; every tensor seen is kept alive so ids stay unique)."""

    def __init__(self, log: OpLog, names: dict[int, str]) -> None:
        super().__init__()
        self.log = log
        self.names = names
        self.layouts: dict[int, L.Layout] = {}
        self.active: set[int] = set()  # derived from the input
        self.summary: dict[int, frozenset] = {}  # summaries (keys) a tensor carries, not yet broadcast
        self.resized: dict[int, frozenset] = {}  # resize and grid-pool events a tensor comes from
        # the grid-pool or resample event the outputs of the call being recorded come from
        self.pending_origin: tuple | None = None
        self.keep: list[Any] = []
        self.stack: list[tuple[str, int]] = []
        self.counts: dict[tuple, int] = {}
        self.by_key: dict[tuple, Event] = {}
        # products of two different activations, as id -> their layouts: a sum of one over
        # positions is a contraction (attention pooling), not a fixed-weight summary
        self.products: dict[int, tuple[L.Layout, L.Layout]] = {}

    # -- bookkeeping ----------------------------------------------------------------------------
    def module(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def layout(self, t: Any) -> L.Layout:
        got = self.layouts.get(id(t))
        if got is None or len(got) != t.dim() or any(L.dim_length(d) > int(s) for d, s in zip(got, t.shape)):
            return L.unknown(t.shape)
        return got

    def emit(self, kind: str, op: str, dims: Sequence[L.Dim], **kw: Any) -> Event:
        module = self.module()
        # the same op in the same module at the same source line: the runs at two sizes align on
        # this even where one takes a branch the other does not (a resize at one size only)
        base = (module, op, kind, _call_site(), kw.get("out_sizes", ()))
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        same_op = (module, op)
        index = self.counts.get(same_op, 0)
        self.counts[same_op] = index + 1
        ev = Event(kind, module, op, L.extent(dims), int(math.prod(L.dim_length(d) for d in dims)),
                   key=(*base, n), function=base[3][2], index=index, **kw)
        self.log.events.append(ev)
        self.by_key[ev.key] = ev
        return ev

    def set(self, out: Any, layout: L.Layout, inputs: Sequence[Any]) -> None:
        if not isinstance(out, TENSOR_LIKE):
            return
        self.keep.append(out)
        self.layouts[id(out)] = layout
        if any(id(t) in self.active for t in inputs):
            self.active.add(id(out))
        came_from = [self.resized.get(id(t), frozenset()) for t in inputs]
        res = frozenset().union(*came_from)
        if len(inputs) > 1 and res:
            self.mark_rejoined(inputs, came_from, res)
        if self.pending_origin is not None:
            res |= {self.pending_origin}
        if res:
            self.resized[id(out)] = res
        summaries = [self.summary.get(id(t), frozenset()) for t in inputs]
        carried = frozenset().union(*summaries)
        if carried and L.is_positional(layout):
            # a summary meets the map: broadcast back (global context), unless it was positional itself
            for t, s in zip(inputs, summaries):
                if s and not L.is_positional(self.layout(t)):
                    for key in s:
                        self.emit("broadcast", "", [], source=key)
            carried = frozenset().union(*(s for t, s in zip(inputs, summaries) if L.is_positional(self.layout(t))))
        if carried:
            self.summary[id(out)] = carried
        else:
            self.summary.pop(id(out), None)

    def mark_rejoined(self, inputs: Sequence[Any], came_from: Sequence[frozenset], keys: frozenset) -> None:
        """A grid meets a positional tensor that does not come from it: it is used on the map again."""
        for key in keys:
            ev = self.by_key.get(key)
            if ev is None or ev.kind != "gridpool" or ev.rejoined:
                continue
            if any(key not in got and L.is_positional(self.layout(t)) for t, got in zip(inputs, came_from)):
                ev.rejoined = True

    def mark_followed(self, inputs: Sequence[Any]) -> None:
        for t in inputs:
            for key in self.resized.get(id(t), ()):
                self.by_key[key].followed = True

    # -- the mode -------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name in _FACTORIES:
            return out  # the shape shortcuts' own outputs
        try:
            self.handle(name, func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - bookkeeping must never break the forward
            pass
        return out

    def handle(self, name: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        outs = _tensors_in(out)
        if not outs:
            return  # sizes, dtypes, flags: nothing to track
        ins = _tensors_in(args) + (_tensors_in(tuple(kwargs.values())) if kwargs else [])
        if ins:
            self.log.calls += 1
        x = args[0] if args and isinstance(args[0], TENSOR_LIKE) else (ins[0] if ins else None)
        rule = _RULES.get(name)
        try:
            if rule is not None and x is not None:
                got = rule(self, x, args, kwargs, out, outs)
                if got is not None:
                    for t, lay in zip(outs, got):
                        self.set(t, lay, ins)
                    return
            self.default(ins, outs)
        finally:
            self.pending_origin = None
            self.track_positions(name, ins, outs)
            if name in ("mul", "multiply") and len(ins) == 2 and ins[0] is not ins[1] \
                    and all(id(t) in self.active for t in ins):
                self.products[id(outs[0])] = (self.layout(ins[0]), self.layout(ins[1]))

    def track_positions(self, op: str, ins: Sequence[Any], outs: Sequence[Any]) -> None:
        self.log.step += 1
        key = ("call", self.module(), op)  # the how-manyth tensor-valued call of this op in this module
        index = self.counts.get(key, 0)
        self.counts[key] = index + 1
        if any(L.is_positional(self.layout(t)) for t in outs):
            self.log.last_positional = self.log.step
        elif any(L.is_positional(self.layout(t)) for t in ins):
            self.log.ends.append((self.log.step, self.module(), op, index))

    def default(self, ins: Sequence[Any], outs: Sequence[Any]) -> None:
        shaped = [(self.layout(t), tuple(t.shape)) for t in ins]
        for o in outs:
            equal = [lay for lay, sh in shaped if sh == tuple(o.shape)]
            same = next((lay for lay in equal if L.is_positional(lay)), equal[0] if equal else None)
            if same is None:
                same = L.broadcast([s for s in shaped if len(s[1]) <= o.dim()], tuple(o.shape)) if shaped \
                    else L.unknown(o.shape)
            self.set(o, same, ins)


def _tensors_in(value: Any) -> list[Any]:
    """Tensors in a value, its tuple/list items and their items (cheaper than a pytree walk,
    which costs more than the op on meta tensors)."""
    if isinstance(value, TENSOR_LIKE):
        return [value]
    if isinstance(value, (tuple, list)):
        out = []
        for v in value:
            if isinstance(v, TENSOR_LIKE):
                out.append(v)
            elif isinstance(v, (tuple, list)):
                out.extend(t for t in v if isinstance(t, TENSOR_LIKE))
        return out
    return []


# ----------------------------------------------------------------------------- per-op layout rules
def _dim(d: Any, rank: int) -> int:
    return int(d) % rank if rank else 0


def _dims_arg(args: tuple, kwargs: dict, pos: int, rank: int, default: Any = None) -> list[int] | None:
    d = args[pos] if len(args) > pos else kwargs.get("dim", default)
    if d is None:
        return None
    if isinstance(d, (list, tuple)):
        return [_dim(v, rank) for v in d]
    if isinstance(d, int):
        return [_dim(d, rank)]
    return None


def _rule_view(r: _Recorder, x, args, kwargs, out, outs):
    return [L.reshape(r.layout(x), tuple(x.shape), tuple(o.shape)) for o in outs]


def _rule_permute(r: _Recorder, x, args, kwargs, out, outs):
    rank, lay, op = x.dim(), r.layout(x), r._op
    rest = list(args[1:])
    if op == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest or kwargs.get("dims")
        return [L.permute(lay, [_dim(d, rank) for d in dims])]
    if op == "t" or (op in ("transpose", "swapaxes", "swapdims") and not rest and rank == 2):
        return [L.permute(lay, list(range(rank))[::-1])]
    if len(rest) < 2 or not all(isinstance(a, int) for a in rest[:2]):
        return None
    a, b = _dim(rest[0], rank), _dim(rest[1], rank)
    order = list(range(rank))
    if op in ("transpose", "swapaxes", "swapdims"):
        return [L.permute(lay, _swap(order, a, b))]
    order.remove(a)
    order.insert(b, a)
    return [L.permute(lay, order)]


def _swap(order: list[int], a: int, b: int) -> list[int]:
    order = list(order)
    order[a], order[b] = order[b], order[a]
    return order


def _rule_unsqueeze(r: _Recorder, x, args, kwargs, out, outs):
    lay = list(r.layout(x))
    d = args[1] if len(args) > 1 else kwargs.get("dim")
    d = int(d) % (x.dim() + 1)
    lay.insert(d, L.channel(1))
    return [tuple(lay)]


def _rule_squeeze(r: _Recorder, x, args, kwargs, out, outs):
    lay = r.layout(x)
    kept = [d for d, s in zip(lay, x.shape) if int(s) != 1]
    if len(kept) == outs[0].dim():
        return [tuple(kept)]
    return [L.reshape(lay, tuple(x.shape), tuple(outs[0].shape))]


def _rule_getitem(r: _Recorder, x, args, kwargs, out, outs):
    idx = args[1] if len(args) > 1 else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        return None
    lay = list(r.layout(x))
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    res: list[L.Dim] = []
    crops: list[tuple[int, int]] = []
    d = 0
    for i in idx:
        if i is Ellipsis:
            take = x.dim() - n_real - d
            res += lay[d:d + max(take, 0)]
            d += max(take, 0)
        elif i is None:
            res.append(L.channel(1))
        elif isinstance(i, int):
            d += 1
        elif isinstance(i, slice):
            start, stop, step = i.indices(int(x.shape[d]))
            length = len(range(start, stop, step))
            if step == 1 and 2 <= length < int(x.shape[d]) and L.positional(lay[d]):
                crops.append((int(x.shape[d]), length))
            res.append(L.resample(lay[d], length, float(step)))
            d += 1
        else:
            return None
    res += lay[d:]
    if len(res) != outs[0].dim():
        return None
    if crops:
        # a crop (a center crop to 16x16, or dropping a class token): a resize to a constant
        # size when its output does not change with the input (judged between the two runs)
        ev = r.emit("resize", "getitem", [], in_sizes=tuple(a for a, _ in crops),
                    out_sizes=tuple(b for _, b in crops))
        r.pending_origin = ev.key
    return [tuple(res)]


def _rule_split(r: _Recorder, x, args, kwargs, out, outs):
    dims = _dims_arg(args, kwargs, 2, x.dim(), 0)
    if dims is None:
        return None
    d = dims[0]
    lay = r.layout(x)
    return [tuple(L.resample(lay[d], int(o.shape[d])) if k == d else lay[k] for k in range(x.dim())) for o in outs]


def _rule_unbind(r: _Recorder, x, args, kwargs, out, outs):
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), x.dim())
    lay = r.layout(x)
    return [tuple(lay[k] for k in range(x.dim()) if k != d) for _ in outs]


def _rule_cat(r: _Recorder, x, args, kwargs, out, outs):
    seq = args[0] if args else kwargs.get("tensors")
    if not isinstance(seq, (list, tuple)) or not seq:
        return None
    first = seq[0]
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), first.dim())
    lay = list(r.layout(max(seq, key=lambda t: int(t.shape[d]))))
    lay[d] = L.extend(lay[d], int(outs[0].shape[d]))
    return [tuple(lay)]


def _rule_stack(r: _Recorder, x, args, kwargs, out, outs):
    seq = args[0] if args else kwargs.get("tensors")
    if not isinstance(seq, (list, tuple)) or not seq:
        return None
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), seq[0].dim() + 1)
    lay = list(r.layout(seq[0]))
    lay.insert(d, L.channel(len(seq)))
    return [tuple(lay)]


def _rule_linear(r: _Recorder, x, args, kwargs, out, outs):
    lay = r.layout(x)
    return [(*lay[:-1], L.channel(outs[0].shape[-1]))]


def _contract_event(r: _Recorder, op: str, dims: Sequence[L.Dim], what: str) -> None:
    if any(L.positional(d) for d in dims):
        r.emit("mixing", op, dims, detail=what)


def _rule_matmul(r: _Recorder, x, args, kwargs, out, outs):
    if len(args) < 2 or not isinstance(args[1], TENSOR_LIKE):
        return None
    a, b = args[0], args[1]
    if a.dim() < 2 or b.dim() < 2:
        return None
    la, lb = r.layout(a), r.layout(b)
    r.mark_followed([a, b])
    if id(a) in r.active and id(b) in r.active:
        # both sides name the same contracted positions: count them once
        dims = [d for d in (la[-1], lb[-2]) if L.positional(d)][:1]
        _contract_event(r, getattr(r, "_op", "matmul"), dims, "a matmul of two activations")
    o = outs[0]
    batch = L.broadcast([(la[:-2], tuple(a.shape[:-2])), (lb[:-2], tuple(b.shape[:-2]))], tuple(o.shape[:-2]))
    return [(*batch, la[-2], lb[-1])]


def _rule_einsum(r: _Recorder, x, args, kwargs, out, outs):
    eq = args[0] if args and isinstance(args[0], str) else None
    ops = list(args[1:]) if len(args) > 2 else (list(args[1]) if len(args) == 2 else [])
    if eq is None or "->" not in eq or len(ops) != len(eq.split("->")[0].split(",")):
        return None
    eq = _expand_ellipsis(eq.replace(" ", ""), ops)
    if eq is None:
        return None
    lhs, rhs = eq.split("->")
    letters: dict[str, L.Dim] = {}
    contracted: dict[str, list[L.Dim]] = {}
    for spec, t in zip(lhs.split(","), ops):
        lay = r.layout(t)
        for ch, d in zip(spec, lay):
            if ch not in letters or (L.positional(d) and not L.positional(letters[ch])):
                letters[ch] = d
            if ch not in rhs:
                contracted.setdefault(ch, []).append(d)
    if sum(id(t) in r.active for t in ops) >= 2:
        dims = [d for ds in contracted.values() for d in ds if L.positional(d)]
        if dims:
            _contract_event(r, "einsum", dims[:1], f"einsum '{eq}' contracts positions between activations")
    return [tuple(letters.get(ch, L.channel(s)) for ch, s in zip(rhs, outs[0].shape))]


def _expand_ellipsis(eq: str, ops: Sequence[Any]) -> str | None:
    """`'...cn,...dn->...cd'` with letters of its own for the dims each `...` stands for
    (right-aligned, as einsum broadcasts them); None when the equation cannot be read."""
    if "..." not in eq:
        return None if "." in eq else eq
    lhs, rhs = eq.split("->")
    specs = lhs.split(",")
    spans = [t.dim() - len(spec.replace("...", "")) if "..." in spec else 0 for spec, t in zip(specs, ops)]
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    n = max(spans, default=0)
    if n > len(free) or any(k < 0 for k in spans):
        return None
    fill = "".join(free[:n])
    specs = [spec.replace("...", fill[n - k:]) for spec, k in zip(specs, spans)]
    return ",".join(specs) + "->" + rhs.replace("...", fill)


def _rule_sdpa(r: _Recorder, x, args, kwargs, out, outs):
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if not isinstance(k, TENSOR_LIKE):
        return None
    lq = r.layout(q)
    r.mark_followed([q, k])
    if id(k) in r.active or id(q) in r.active:
        _contract_event(r, "scaled_dot_product_attention", [r.layout(k)[-2]], "attention")
    return [(*lq[:-1], L.channel(outs[0].shape[-1]))]


def _rule_mha(r: _Recorder, x, args, kwargs, out, outs):
    q = args[0] if args else kwargs.get("query")
    k = args[1] if len(args) > 1 else kwargs.get("key")
    if not isinstance(k, TENSOR_LIKE) or not isinstance(q, TENSOR_LIKE):
        return None
    _contract_event(r, "multi_head_attention", [r.layout(k)[0]], "attention")
    lq = r.layout(q)
    res = [(*lq[:-1], L.channel(outs[0].shape[-1]))]
    if len(outs) > 1:
        res.append(L.unknown(outs[1].shape))
    return res


def _rule_fft(r: _Recorder, x, args, kwargs, out, outs):
    name = getattr(r, "_fft_name", "")
    rank = x.dim()
    dims = _dims_arg(args, kwargs, 2 if name.endswith("n") or "2" in name else 2, rank)
    if dims is None:
        dims = [rank - 2, rank - 1] if "2" in name else (list(range(rank)) if name.endswith("n") else [rank - 1])
    lay = list(r.layout(x))
    _contract_event(r, name or "fft", [lay[d] for d in dims], "a Fourier transform")
    o = outs[0]
    return [tuple(L.resample(lay[k], int(o.shape[k])) if k < len(lay) else L.channel(o.shape[k])
                  for k in range(o.dim()))] if o.dim() == rank else None


def _rule_reduce(r: _Recorder, x, args, kwargs, out, outs):
    rank = x.dim()
    if len(args) > 1 and isinstance(args[1], TENSOR_LIKE):
        return None  # elementwise max/min of two tensors
    dims = _dims_arg(args, kwargs, 1, rank)
    if dims is None:
        dims = list(range(rank))
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False)
    lay = r.layout(x)
    reduced = [lay[d] for d in dims]
    ev = None
    factors = r.products.get(id(x)) if getattr(r, "_op", "") in _WEIGHTED_SUMS else None
    if factors is not None and all(any(L.positional(f[d]) for d in dims) for f in factors):
        # sum_n a_n * b_n with both factors varying over the positions n: weights that depend
        # on the input, i.e. a contraction of two activations (additive attention pooling)
        _contract_event(r, r._op, [d for d in reduced if L.positional(d)][:1],
                        "a weighted sum of two activations over positions (attention pooling)")
    elif any(L.positional(d) for d in reduced):
        ev = r.emit("summary", getattr(r, "_op", "mean"), reduced)
    res = []
    for o in outs:
        new = [L.reduce_dim(lay[k]) if k in dims else lay[k] for k in range(rank)] if keep \
            else [lay[k] for k in range(rank) if k not in dims]
        res.append(tuple(new) if len(new) == o.dim() else L.unknown(o.shape))
    if ev is not None:
        for o in outs:
            r.summary[id(o)] = frozenset({ev.key})
        ins = [t for t in (args[0],) if isinstance(t, TENSOR_LIKE)]
        for o, lay_o in zip(outs, res):
            r.keep.append(o)
            r.layouts[id(o)] = lay_o
            if any(id(t) in r.active for t in ins):
                r.active.add(id(o))
        return []  # set already
    return res


def _rule_vector_norm(r: _Recorder, x, args, kwargs, out, outs):
    """`norm(x, p, dim, keepdim)` and `linalg.vector_norm(x, ord, dim, keepdim)`: a reduction whose
    dims come third (GRN's `x.norm(p=2, dim=(1, 2))` is a summary over positions)."""
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    keep = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
    return _rule_reduce(r, x, (x, dim, bool(keep)), {}, out, outs)


def _rule_normalize(r: _Recorder, x, args, kwargs, out, outs):
    """`F.normalize(x, p, dim)` divides by a norm over `dim`: over positions, a norm whose
    statistics span them."""
    dims = _dims_arg(args, kwargs, 2, x.dim(), default=1)
    lay = r.layout(x)
    stats = [lay[d] for d in dims or []]
    if any(L.positional(d) for d in stats):
        r.emit("norm", "normalize", stats, detail="F.normalize norm")
    return [lay for _ in outs]


def _rule_scan(r: _Recorder, x, args, kwargs, out, outs):
    dims = _dims_arg(args, kwargs, 1, x.dim())
    lay = r.layout(x)
    if dims:
        _contract_event(r, getattr(r, "_op", "scan"), [lay[dims[0]]], "a scan")
    return [lay for _ in outs]


def _spatial_resample(r: _Recorder, x, o, n: int, kernel, stride, dilation) -> L.Layout:
    lay = list(r.layout(x))
    k, s, d = _tup(kernel, n), _tup(stride if stride not in (None, ()) else kernel, n), _tup(dilation, n)
    start = x.dim() - n
    for i in range(n):
        lay[start + i] = L.resample(lay[start + i], int(o.shape[start + i]), float(s[i]),
                                    float((int(k[i]) - 1) * int(d[i])))
    if o.dim() == len(lay):
        lay[start - 1] = L.channel(o.shape[start - 1]) if start >= 1 else lay[0]
        return tuple(lay)
    return L.unknown(o.shape)


def _rule_conv(r: _Recorder, x, args, kwargs, out, outs):
    n = _CONVS[r._op]
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
    dil = args[5] if len(args) > 5 else kwargs.get("dilation", 1)
    r.mark_followed([x])
    return [_spatial_resample(r, x, outs[0], n, tuple(w.shape[2:]), stride, dil)]


def _rule_pool(r: _Recorder, x, args, kwargs, out, outs):
    n = _POOLS[r._op]
    k = args[1] if len(args) > 1 else kwargs.get("kernel_size")
    s = args[2] if len(args) > 2 else kwargs.get("stride")
    d = args[4] if len(args) > 4 and "max" in r._op else kwargs.get("dilation", 1)
    r.mark_followed([x])
    lay = _spatial_resample(r, x, outs[0], n, k, s, d)
    return [lay for _ in outs]


def _adaptive(r: _Recorder, x, o, n: int, op: str) -> L.Layout:
    lay = list(r.layout(x))
    start = x.dim() - n
    pooled = []
    for i in range(n):
        a, b = int(x.shape[start + i]), int(o.shape[start + i])
        if b < a:
            ratio = a / b
            pooled.append(lay[start + i])
            lay[start + i] = L.resample(lay[start + i], b, ratio, ratio - 1)
    if pooled and any(L.positional(p) for p in pooled):
        cells = [tuple(L.Atom(at.axis, at.step, -(-at.length // int(o.shape[start + i])), at.span) for at in p)
                 for i, p in enumerate(pooled)]
        ev = r.emit("summary", op, cells)
        r.summary_next = ev.key
        if L.is_positional(tuple(lay)):
            # pooled to a grid of several cells (a pyramid-pooling level, a query pooled to the
            # window grid): each cell summarises an extent that grows with the input
            grid = r.emit("gridpool", op, cells)
            # sizes kept out of the event's key: a grid that follows the input on some axis
            # (pooled over H only) must still pair with its twin at the other size
            grid.in_sizes = tuple(int(s) for s in x.shape[start:])
            grid.out_sizes = tuple(int(s) for s in o.shape[start:])
            r.pending_origin = grid.key
    return tuple(lay)


def _rule_adaptive(r: _Recorder, x, args, kwargs, out, outs):
    n = _ADAPTIVE[r._op]
    r.summary_next = None
    lay = _adaptive(r, x, outs[0], n, r._op)
    return _with_summary(r, [lay for _ in outs], outs, x)


def _with_summary(r: _Recorder, lays, outs, x):
    key = getattr(r, "summary_next", None)
    if key is None:
        return lays
    for o, lay in zip(outs, lays):
        r.keep.append(o)
        r.layouts[id(o)] = lay
        if id(x) in r.active:
            r.active.add(id(o))
        res = r.resized.get(id(x), frozenset()) | ({r.pending_origin} if r.pending_origin is not None else set())
        if res:
            r.resized[id(o)] = res
        # a pool to a map of several positions is still a map: its summary is judged as positions
        if not L.is_positional(lay):
            r.summary[id(o)] = frozenset({key})
    return []


def _resample_event(r: _Recorder, x, o, op: str) -> tuple[L.Layout, Event]:
    """A resample of the spatial dims of `x` to those of `o` (a resize, a sampling grid): the
    output's layout, and a "resize" event that remembers the grid pools its input came from."""
    lay = list(r.layout(x))
    for i in range(x.dim() - 2):
        a, b = int(x.shape[2 + i]), int(o.shape[2 + i])
        lay[2 + i] = L.resample(lay[2 + i], b, a / b, max(a / b - 1, 0.0))
    grids = frozenset(k for k in r.resized.get(id(x), ()) if r.by_key[k].kind == "gridpool")
    ev = r.emit("resize", op, [], in_sizes=tuple(int(s) for s in x.shape[2:]),
                out_sizes=tuple(int(s) for s in o.shape[2:]), from_grids=grids)
    r.mark_followed([x])
    return tuple(lay), ev


def _rule_interpolate(r: _Recorder, x, args, kwargs, out, outs):
    o = outs[0]
    lay, ev = _resample_event(r, x, o, "interpolate")
    r.keep.append(o)
    r.layouts[id(o)] = tuple(lay)
    if id(x) in r.active:
        r.active.add(id(o))
    r.resized[id(o)] = r.resized.get(id(x), frozenset()) | {ev.key}
    return []


def _rule_grid_sample(r: _Recorder, x, args, kwargs, out, outs):
    """`F.grid_sample(x, grid)`: the output takes the grid's spatial size. A grid of a constant
    size (a learned sampling grid) resizes like `interpolate` to a constant size; a grid built
    for the input's size (`affine_grid(theta, x.size())`, a deformable offset field) keeps the
    map. The grid's own inputs (a theta pooled from the map) reach every output position."""
    o = outs[0]
    if o.dim() != x.dim():
        return None
    lay, ev = _resample_event(r, x, o, "grid_sample")
    r.pending_origin = ev.key  # set() adds it to the output's origins
    return [lay]


def _rule_pad(r: _Recorder, x, args, kwargs, out, outs):
    """Padding (timm's TF-"same" convs pad by amounts computed from the size): each padded dim
    keeps its positions, with a border added."""
    o = outs[0]
    if o.dim() != x.dim():
        return None
    lay = list(r.layout(x))
    for d in range(x.dim()):
        if int(o.shape[d]) != int(x.shape[d]):
            atoms = lay[d]
            if len(atoms) == 1 and atoms[0].axis is not None and L.dim_length(atoms) == int(x.shape[d]):
                # the border continues the run of positions at the same spacing: a map padded to
                # a multiple of the window still splits into windows of positions
                a = atoms[0]
                lay[d] = (L.Atom(a.axis, a.step, int(o.shape[d]), a.span),)
            else:
                lay[d] = L.resample(lay[d], int(o.shape[d]), 1.0, 0.0)
    return [tuple(lay)]


def _rule_norm(r: _Recorder, x, args, kwargs, out, outs):
    lay = r.layout(x)
    rank = x.dim()
    if r._op == "layer_norm":
        shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
        n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
        dims = list(range(rank - n, rank))
    else:
        dims = list(range(2, rank))
    stats = [lay[d] for d in dims]
    if any(L.positional(d) for d in stats):
        r.emit("norm", _NORMS[r._op], stats, detail=f"{_NORMS[r._op]} statistics")
    return [lay for _ in outs]


def _rule_unfold(r: _Recorder, x, args, kwargs, out, outs):
    o = outs[0]
    if x.dim() != 4 or o.dim() != 3:
        return None
    k = _tup(args[1] if len(args) > 1 else kwargs.get("kernel_size"), 2)
    s = _tup(kwargs.get("stride", args[4] if len(args) > 4 else 1), 2)
    d = _tup(kwargs.get("dilation", args[2] if len(args) > 2 else 1), 2)
    p = _tup(kwargs.get("padding", args[3] if len(args) > 3 else 0), 2)
    lay = r.layout(x)
    sizes = [(int(x.shape[2 + i]) + 2 * int(p[i]) - int(d[i]) * (int(k[i]) - 1) - 1) // int(s[i]) + 1 for i in range(2)]
    if sizes[0] * sizes[1] != int(o.shape[2]):
        return None
    hs = L.resample(lay[2], sizes[0], float(s[0]), float((int(k[0]) - 1) * int(d[0])))
    ws = L.resample(lay[3], sizes[1], float(s[1]), float((int(k[1]) - 1) * int(d[1])))
    return [(lay[0], L.channel(o.shape[1]), (*hs, *ws))]


def _rule_fold(r: _Recorder, x, args, kwargs, out, outs):
    """`F.fold` (col2im) puts a sequence of blocks back on a map: where the blocks came from
    positions along H, W (an unfold, a window partition), the output is a map of them again."""
    o = outs[0]
    if x.dim() != 3 or o.dim() != 4:
        return None
    blocks = r.layout(x)[2]
    axes = [a for a in blocks if a.axis is not None]
    if not L.positional(blocks) or len(axes) != 2 or axes[0].axis == axes[1].axis:
        return None
    rows, cols = sorted(axes, key=lambda a: a.axis)
    dims = []
    for atom, size in ((rows, int(o.shape[2])), (cols, int(o.shape[3]))):
        step = atom.step * atom.length / size if size else atom.step
        dims.append((L.Atom(atom.axis, step, size, max(step, 1.0)),))
    return [(r.layout(x)[0], L.channel(o.shape[1]), *dims)]


def _with_op(name: str, rule: Callable) -> Callable:
    def run(r: _Recorder, *a):
        r._op = name
        r._fft_name = name
        return rule(r, *a)
    return run


_RULES: dict[str, Callable] = {}
for _n in _VIEWS:
    _RULES[_n] = _rule_view
for _n in _PERMUTES:
    _RULES[_n] = _with_op(_n, _rule_permute)
_RULES.update({"unsqueeze": _rule_unsqueeze, "squeeze": _rule_squeeze, "getitem": _rule_getitem,
               "split": _rule_split, "chunk": _rule_split, "tensor_split": _rule_split,
               "split_with_sizes": _rule_split, "unbind": _rule_unbind, "cat": _rule_cat, "concat": _rule_cat,
               "concatenate": _rule_cat, "stack": _rule_stack, "linear": _rule_linear, "einsum": _rule_einsum,
               "scaled_dot_product_attention": _rule_sdpa, "multi_head_attention_forward": _rule_mha,
               "interpolate": _rule_interpolate, "upsample": _rule_interpolate, "grid_sample": _rule_grid_sample, "fold": _rule_fold, "unfold": _rule_unfold,
               "pad": _rule_pad, "constant_pad_nd": _rule_pad})
for _n in _MATMULS:
    _RULES[_n] = _with_op(_n, _rule_matmul)
for _n in _FFTS:
    _RULES[_n] = _with_op(_n, _rule_fft)
for _n in _REDUCTIONS:
    _RULES[_n] = _with_op(_n, _rule_reduce)
for _n in _VECTOR_NORMS:
    _RULES[_n] = _with_op(_n, _rule_vector_norm)
_RULES["normalize"] = _rule_normalize
for _n in _SCANS:
    _RULES[_n] = _with_op(_n, _rule_scan)
for _n in _NORMS:
    _RULES[_n] = _with_op(_n, _rule_norm)
for _n in _POOLS:
    _RULES[_n] = _with_op(_n, _rule_pool)
for _n in _ADAPTIVE:
    _RULES[_n] = _with_op(_n, _rule_adaptive)
for _n in _CONVS:
    _RULES[_n] = _with_op(_n, _rule_conv)


# ----------------------------------------------------------------------------- module-level rules
def _module_rule(r: _Recorder, mod: nn.Module, args: tuple, out: Any) -> None:
    """Built-in modules the shape shortcuts answered without running their torch calls."""
    x = args[0] if args and isinstance(args[0], TENSOR_LIKE) else None
    outs = _tensors_in(out)
    if x is None or not outs:
        return
    op = None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        r._op = f"conv{len(mod.kernel_size)}d"
        lay = _spatial_resample(r, x, outs[0], len(mod.kernel_size), mod.kernel_size, mod.stride, mod.dilation)
        r.mark_followed([x])
        op = [lay]
    elif isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        n = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool3d: 3, nn.AvgPool3d: 3}.get(type(mod), 2)
        r.mark_followed([x])
        op = [_spatial_resample(r, x, outs[0], n, mod.kernel_size, mod.stride or mod.kernel_size,
                                getattr(mod, "dilation", 1)) for _ in outs]
    elif isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        name = type(mod).__name__
        r.summary_next = None
        lay = _adaptive(r, x, outs[0], int(name[-2]), name)
        got = _with_summary(r, [lay for _ in outs], outs, x)
        op = got if got else None
        if not got:
            return
    elif isinstance(mod, nn.Upsample):
        _rule_interpolate(r, x, (x,), {}, out, outs)
        return
    elif isinstance(mod, nn.Linear):
        op = [_rule_linear(r, x, args, {}, out, outs)[0]]
    elif isinstance(mod, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)):
        r._op = {nn.GroupNorm: "group_norm", nn.LayerNorm: "layer_norm"}.get(type(mod), "instance_norm")
        if isinstance(mod, nn.LayerNorm):
            op = _rule_norm(r, x, (x, tuple(mod.normalized_shape)), {}, out, outs)
        else:
            op = _rule_norm(r, x, (x,), {}, out, outs)
    elif isinstance(mod, nn.RNNBase):
        seq = 1 if mod.batch_first else 0
        lay = r.layout(x)
        if x.dim() == 3:
            _contract_event(r, type(mod).__name__, [lay[seq]], "a recurrence")
        op = [(*lay[:-1], L.channel(outs[0].shape[-1])) if t is outs[0] else L.unknown(t.shape) for t in outs]
    elif isinstance(mod, nn.MultiheadAttention) and len(args) >= 2:
        k = args[1]
        seq = 1 if mod.batch_first else 0
        _contract_event(r, "MultiheadAttention", [r.layout(k)[seq]], "attention")
        lq = r.layout(x)
        op = [(*lq[:-1], L.channel(outs[0].shape[-1]))] + [L.unknown(t.shape) for t in outs[1:]]
    elif isinstance(mod, nn.Flatten):
        op = [_rule_view(r, x, (), {}, out, outs)[0]]
    try:
        if op is None:
            r.default([x], outs)
            return
        for t, lay in zip(outs, op):
            r.set(t, lay, [x])
    finally:
        r.pending_origin = None


@contextlib.contextmanager
def _module_stack(r: _Recorder, model: nn.Module) -> Iterator[None]:
    names = {id(m): name for name, m in model.named_modules()}

    def pre(mod, args):
        name = names.get(id(mod))
        if name is not None:
            r.stack.append((name, r.log.calls))
        return None

    def post(mod, args, out):
        name = names.get(id(mod))
        if name is None or not r.stack:
            return None
        _, calls = r.stack.pop()
        # a built-in leaf module the shortcuts answered without torch calls; a container (a
        # Sequential of such leaves) made no calls either, but its children's hooks judged them
        if r.log.calls == calls and type(mod).__module__.startswith("torch.nn") \
                and next(mod.children(), None) is None:
            try:
                r.stack.append((name, calls))
                _module_rule(r, mod, args, out)
                r.track_positions(type(mod).__name__, _tensors_in(args), _tensors_in(out))
            except Exception:  # noqa: BLE001
                pass
            finally:
                r.stack.pop()
        return None

    with global_module_hooks(pre, post):
        yield


def record_ops(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> OpLog:
    """Run the eager model once on a meta input of `input_shape` and log every op that combines
    positions (never raises: a failure is kept in `.error`, with the events up to it)."""
    from mixfx.shapes import _FunctionShortcuts, meta_weights, shortcut_forwards

    log = OpLog(tuple(input_shape))
    x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    rec = _Recorder(log, {})
    rec.layouts[id(x)] = L.input_layout(x.shape)
    rec.active.add(id(x))
    rec.keep.append(x)
    try:
        with meta_weights(model), shortcut_forwards(model, share_outputs=False), _FunctionShortcuts(False), \
                _module_stack(rec, model), \
                torch.no_grad():
            with rec:
                model(x)
    except Exception as exc:  # noqa: BLE001 - a failure is a finding
        log.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return log


# ----------------------------------------------------------------------------- judgement
@dataclass
class Finding:
    kind: str  # mixing | context | resized
    module: str
    op: str
    reason: str
    out_sizes: tuple = ()
    function: str = ""  # the model's function that made the call (attribution of top-level code)
    index: int = 0  # the how-manyth such op in its module


def _axes_text(ext: dict[int, float], names: Sequence[str]) -> str:
    return ", ".join(names[a] if a < len(names) else f"axis {a}" for a in sorted(ext)) or "positions"


def _grows(a: Event, b: Event | None, input_sizes: Sequence[int]) -> bool:
    if b is not None:
        return a.length != b.length or any(abs(a.extent.get(ax, 0) - b.extent.get(ax, 0)) > 1e-6
                                           for ax in set(a.extent) | set(b.extent))
    # one run only: an extent that covers a whole input axis
    return any(ax < len(input_sizes) and e >= input_sizes[ax] for ax, e in a.extent.items())


def judge(first: OpLog, second: OpLog | None, axis_names: Sequence[str]) -> list[Finding]:
    """Global mixing, global context and constant-size resizes, from two runs (or one)."""
    other = {e.key: e for e in second.events} if second is not None else {}
    sizes = first.input_shape[2:]
    found: list[Finding] = []
    summaries: dict[tuple, Event] = {e.key: e for e in first.events if e.kind == "summary"}
    growing_summary: set[tuple] = set()
    # grids resized back to a size that follows the input are on the map again (pyramid pooling)
    back_on_map = {g for e in first.events if e.kind == "resize" and e.from_grids
                   and (second is None or (e.key in other and other[e.key].out_sizes != e.out_sizes))
                   for g in e.from_grids}
    for e in first.events:
        twin = other.get(e.key) if second is not None else None
        if second is not None and twin is None:
            continue  # not reached at the other size: no comparison
        if e.kind == "summary":
            if _grows(e, twin, sizes):
                growing_summary.add(e.key)
        elif e.kind == "mixing" and _grows(e, twin, sizes):
            reach = "grows with the input" + (f" ({e.length} positions here)" if e.length > 1 else "")
            found.append(Finding("mixing", e.module, e.op,
                                 f"{e.detail or e.op} over {_axes_text(e.extent, axis_names)}: the extent it "
                                 f"combines {reach}", function=e.function, index=e.index))
        elif e.kind == "norm" and _grows(e, twin, sizes):
            found.append(Finding("context", e.module, e.op,
                                 f"{e.detail} over all of {_axes_text(e.extent, axis_names)} (a summary of every "
                                 "position, applied back to the map)", function=e.function, index=e.index))
        elif e.kind == "gridpool" and e.followed and _grows(e, twin, sizes) and twin is not None \
                and twin.out_sizes == e.out_sizes and not e.rejoined and e.key not in back_on_map:
            # the grid goes on as the map: a resize to a constant size by pooling
            found.append(Finding("resized", e.module, e.op,
                                 f"pooled to a {'x'.join(map(str, e.out_sizes))} grid ({e.op}): nothing after it "
                                 "varies with the input", e.out_sizes, e.function, e.index))
        elif e.kind == "gridpool" and e.followed and _grows(e, twin, sizes):
            found.append(Finding("context", e.module, e.op,
                                 f"{e.op} to a grid of fixed size: each cell summarises a part of "
                                 f"{_axes_text(e.extent, axis_names)} that grows with the input, and the grid "
                                 "is used on the map again", function=e.function, index=e.index))
        elif e.kind == "resize" and e.followed:
            const = twin is not None and twin.out_sizes == e.out_sizes and twin.in_sizes != e.in_sizes
            if const and any(s > 1 for s in e.out_sizes):
                how = "cropped" if e.op == "getitem" else "resized"
                found.append(Finding("resized", e.module, e.op,
                                     f"{how} to {'x'.join(map(str, e.out_sizes))}: nothing after it varies with "
                                     "the input", e.out_sizes, e.function, e.index))
    seen: set[tuple] = set()
    for e in first.events:
        if e.kind == "broadcast" and e.source in growing_summary and e.source not in seen:
            seen.add(e.source)
            src = summaries[e.source]
            found.append(Finding("context", src.module, src.op,
                                 f"{src.op} over {_axes_text(src.extent, axis_names)} broadcast back onto the map"
                                 + (f" at `{e.module}`" if e.module and e.module != src.module else ""),
                                 function=src.function, index=src.index))
    return found
