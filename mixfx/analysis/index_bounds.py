"""Index bounds: constraints a meta run cannot see.

Meta and fake tensors carry no values, so an op that reads a fixed-size table at indices computed
from the input size (MViTv2's relative-position tables `rel_pos_h[dist_h]`, an embedding of
arange-built distances, a gather) "runs" at every size on meta tensors, while the eager model
fails past some size with `IndexError: index 111 is out of bounds for dimension 0 with size 111`.

`IndexValues` closes the gap inside every eager meta forward (`shapes.eager_meta_forward`): a
tensor computed only from constants and sizes (arange, zeros, Python numbers, and ops on such
tensors) gets its real value alongside the meta one (small: such tensors are index tables and
masks), and an indexing op whose index is such a tensor is run once for real, on zero stand-ins
for the activations and weights it reads (stride-0 expanded zeros: no memory). A read past the
end raises torch's own error, as the eager forward would. Each checked read is also logged
(`collect`), so the analyser can tell reads whose index grows with the input size while the
table does not, and find the largest size each spatial dim runs at (`find_bounds`): the
constraint (`H <= 224`) that shows in the report.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

# elements of a constant-valued tensor kept with its real value (index tables, masks); larger
# ones stay meta-only (no value, no check)
VALUE_LIMIT = 1 << 20
# output elements of an indexing op run for real to check its indices
CHECK_LIMIT = 1 << 22

# ops that read or write a tensor at positions given by an index tensor
INDEXING = frozenset({
    "__getitem__", "__setitem__", "index_select", "gather", "embedding", "embedding_bag", "take",
    "take_along_dim", "index_put", "index_put_", "index_add", "index_add_", "index_copy", "index_copy_",
    "index_fill", "index_fill_", "index_reduce", "index_reduce_", "scatter", "scatter_", "scatter_add",
    "scatter_add_", "scatter_reduce", "scatter_reduce_", "one_hot",
})
# ops whose output ignores the values of `self` (its dtype, device and shape only)
_SELF_METADATA_ONLY = frozenset({"new_zeros", "new_ones", "new_full", "new_tensor", "zeros_like", "ones_like",
                                 "full_like"})
# ops whose output ignores the values of every tensor argument after the first (`x.to(other)`)
_OTHERS_METADATA_ONLY = frozenset({"to", "type_as"})
_INPLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                              "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                              "__ilshift__", "__irshift__"})
# outputs that leave the device (a Python value, or a CPU tensor): the real value is the answer
_TO_HOST = frozenset({"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                      "__len__"})
_BOUND_ERRORS = ("out of bounds", "index out of range", "out of range in self", "must be in range",
                 "Class values must be smaller than num_classes")


def is_bound_error(text: str | None) -> bool:
    """Whether an error message is torch's index-out-of-bounds wording."""
    return bool(text) and any(s in text for s in _BOUND_ERRORS)


@dataclass
class IndexRead:
    """One indexing op whose index values were known, in one forward."""

    input_shape: tuple[int, ...]
    site: str  # where the model's code made the call: "function (file:line)"
    op: str
    table: tuple[tuple[int, ...], ...]  # shapes of the tensors it reads or writes (no value known)
    low: int | None  # smallest and largest index value
    high: int | None
    count: int  # how many reads at this site came before, in this forward
    error: str | None = None  # torch's error where an index was out of bounds

    @property
    def key(self) -> tuple:
        return self.site, self.op, self.count


_COLLECTOR: contextvars.ContextVar[list[IndexRead] | None] = contextvars.ContextVar("mixfx_index_reads",
                                                                                    default=None)


@contextlib.contextmanager
def collect() -> Iterator[list[IndexRead]]:
    """Log every checked index read of the eager meta forwards run inside the block."""
    reads: list[IndexRead] = []
    token = _COLLECTOR.set(reads)
    try:
        yield reads
    finally:
        _COLLECTOR.reset(token)


def _tensor_leaves(args: Sequence[Any], kwargs: dict) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    out.append(b)
                elif isinstance(b, (list, tuple)):
                    out.extend(c for c in b if isinstance(c, torch.Tensor))
    return out


def _name(func: Any) -> str:
    return getattr(func, "__name__", None) or ""


def _has_meta(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if isinstance(value, (list, tuple)):
        return any(_has_meta(v) for v in value)
    return False


def _numel(value: Any) -> int:
    return sum(t.numel() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def _on_cpu(v: Any) -> Any:
    if isinstance(v, torch.device) and v.type == "meta":
        return torch.device("cpu")
    if isinstance(v, str) and v == "meta":
        return "cpu"
    return v


_NOT_RUN = object()


@contextlib.contextmanager
def _only_bound_errors() -> Iterator[None]:
    """Bookkeeping that fails (an op this module does not foresee) leaves the forward as it was
    without it; an index past its end is the one error it raises."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        if is_bound_error(str(exc)):
            raise
# in-place ops that change a tensor's shape (the others keep it: the meta tensor needs no run)
_META_INPLACE = frozenset({"resize_", "resize_as_", "unsqueeze_", "squeeze_", "transpose_", "t_", "as_strided_",
                           "set_", "swapdims_", "swapaxes_"})


def _estimate(args: Sequence[Any], kwargs: dict) -> int:
    """Elements of an op's output, roughly: the broadcast of its inputs' shapes."""
    tensors = _tensor_leaves(args, kwargs)
    try:
        return math.prod(torch.broadcast_shapes(*(t.shape for t in tensors)))
    except Exception:  # noqa: BLE001 - not broadcastable (cat, matmul): their total
        return sum(t.numel() for t in tensors)


def _lands_on_meta(name: str, args: Sequence[Any], kwargs: dict) -> bool:
    """Whether the eager meta forward's output of this call is on the meta device (it has a meta
    input) rather than on the host."""
    if name in _TO_HOST:
        return False
    if name == "to":
        for a in (*args[1:], *kwargs.values()):
            if isinstance(a, torch.Tensor):
                return a.is_meta
            if isinstance(a, (str, torch.device)) and str(a) in ("cpu", "meta") or isinstance(a, torch.device):
                return torch.device(a).type == "meta"
    return True


def _twins(real: Any, same: dict[int, torch.Tensor]) -> Any:
    if isinstance(real, torch.Tensor):
        got = same.get(id(real))
        if got is not None:
            return got
        return torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device="meta")
    if isinstance(real, (list, tuple)):
        items = [_twins(r, same) for r in real]
        try:
            return type(real)(items)  # list, tuple, torch.return_types
        except TypeError:
            return type(real)(*items)  # a namedtuple
    return real


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A real tensor of `t`'s shape and dtype that costs no memory (its values are not read)."""
    return torch.zeros((), dtype=t.dtype).expand(t.shape)


class IndexValues(TorchFunctionMode):
    """Real values for the constant-valued tensors of a meta forward, and a real check of every
    indexing op that reads at such indices. Enter it last (innermost), so that it sees each call
    before the shape shortcuts answer it."""

    def __init__(self, input_shape: Sequence[int] = ()) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(meta) -> (meta, real)
        self.counts: dict[tuple[str, str], int] = {}
        self.reads = _COLLECTOR.get()

    def _known(self, t: torch.Tensor) -> bool:
        return not t.is_meta or id(t) in self.values

    def _real(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if not v.is_meta:
                return v
            got = self.values.get(id(v))
            return got[1] if got is not None else _stand_in(v)
        return _on_cpu(v)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "__get__":  # a property (`.shape`, `.device`): no values involved
            return func(*args, **kwargs)
        tensors = _tensor_leaves(args, kwargs)
        if tensors and not any(id(t) in self.values for t in tensors):
            return func(*args, **kwargs)  # reads no value we know: nothing to compute or check
        # below, the modes under this one (the shape shortcuts) are kept out: they would answer
        # `.is_meta` asked here, and give real tensors shape-only (uninitialised) results
        if not tensors:
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
                with _only_bound_errors():
                    if _has_meta(out):  # a factory on the meta device (`torch.arange(n, device=x.device)`)
                        return self._constant(func, args, kwargs, out)
                    self._remember_real(out)  # `torch.arange(n)`: known, and may go to the meta device
            return out
        route = "plain"
        with _only_bound_errors(), torch._C.DisableTorchFunction():
            route = self._route(name, tensors)
            if route == "constant":
                route = "mixed"
                got = self._constant(func, args, kwargs)
                if got is not _NOT_RUN:
                    return got
        if route == "real":  # real tensors only: computed as the eager forward would
            with torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
                self._remember_real(out)
            return out
        out = func(*args, **kwargs)
        if route == "mixed":
            with _only_bound_errors(), torch._C.DisableTorchFunction():
                self._after(func, name, args, kwargs, out)
        return out

    def _remember_real(self, out: Any) -> None:
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_meta and t.numel() <= VALUE_LIMIT:
                self.values[id(t)] = (t, t)

    def _route(self, name: str, tensors: list[torch.Tensor]) -> str:
        """constant (every value it reads is known, one is meta), real (real tensors only),
        mixed (reads a value we do not know)."""
        if name in _OTHERS_METADATA_ONLY:
            values = tensors[:1]
        elif name in _SELF_METADATA_ONLY:
            values = tensors[1:]
        else:
            values = tensors
        if all(self._known(t) for t in values):
            return "constant" if any(t.is_meta for t in tensors) else "real"
        return "mixed"

    def _after(self, func, name: str, args, kwargs, out: Any) -> None:
        """A call that read unknown values: check its indices, forget what it overwrote."""
        if name in INDEXING and any(self._known(t) for t in _tensor_leaves(args, kwargs)):
            self._check(func, name, args, kwargs, out)
        if (name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))) \
                and args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.values:
            self._forget(args[0])  # written with values we do not know

    # -- constants --------------------------------------------------------------------------------
    def _constant(self, func, args, kwargs, out: Any = None) -> Any:
        """A call whose inputs are all known: run it on their real values (small tensors: C++
        speed, where meta kernels of such small ops are slow Python), and give its outputs meta
        twins (`out`, the meta result of a factory, when there is one). NOT_RUN where too large
        or where the real run fails for a reason other than an index bound."""
        name = _name(func)
        if (out is not None and _numel(out) > VALUE_LIMIT) or (out is None and _estimate(args, kwargs) > VALUE_LIMIT):
            return _NOT_RUN if out is None else out
        real_args, real_kwargs = tree_map(self._real, (args, kwargs))
        try:
            real = func(*real_args, **real_kwargs)
        except Exception as exc:  # noqa: BLE001
            if is_bound_error(str(exc)):
                self._log(name, args, kwargs, str(exc))
                raise
            return _NOT_RUN if out is None else out  # a failure we cannot place: meta semantics, as before
        if name in INDEXING:
            self._log(name, args, kwargs, None)
        if out is None:
            if not _lands_on_meta(name, args, kwargs):
                return real  # `.item()`, `.tolist()`, `.cpu()`: the value itself
            if name in _META_INPLACE:
                func(*args, **kwargs)  # the meta tensor's own shape changes too
            # outputs that are inputs (in-place ops, `x.to(x.dtype)`) stay the same object
            same = {id(self._real(t)): t for t in _tensor_leaves(args, kwargs) if t.is_meta}
            out = _twins(real, same)
        self._pair(out, real)
        return out

    def _pair(self, out: Any, real: Any) -> None:
        if isinstance(out, torch.Tensor):
            if out.is_meta and isinstance(real, torch.Tensor) and out.shape == real.shape \
                    and real.numel() <= VALUE_LIMIT:
                self.values[id(out)] = (out, real)
        elif isinstance(out, (list, tuple)) and isinstance(real, (list, tuple)) and len(out) == len(real):
            for m, r in zip(out, real):
                self._pair(m, r)

    def _forget(self, t: torch.Tensor) -> None:
        """Drop the value of `t` and of every known tensor sharing its real storage."""
        real = self.values.pop(id(t))[1]
        ptr = real.untyped_storage().data_ptr()
        for k in [k for k, (_, r) in self.values.items() if r.untyped_storage().data_ptr() == ptr]:
            del self.values[k]

    # -- checks -----------------------------------------------------------------------------------
    def _check(self, func, name: str, args, kwargs, out: Any) -> None:
        """Run an indexing op for real, at its known indices, on zero stand-ins for the rest:
        torch checks the bounds as in the eager forward."""
        if _numel(out) > CHECK_LIMIT:
            return
        real_args, real_kwargs = tree_map(self._real, (list(args), kwargs))
        inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))
        if inplace and real_args and isinstance(args[0], torch.Tensor):
            if args[0].numel() > CHECK_LIMIT:
                return
            real_args[0] = torch.zeros(args[0].shape, dtype=args[0].dtype)  # written to: must be writable
        try:
            with torch._C.DisableTorchFunction():
                func(*real_args, **real_kwargs)
        except Exception as exc:  # noqa: BLE001
            if is_bound_error(str(exc)):
                self._log(name, args, kwargs, str(exc))
                raise
            return  # the stand-ins cannot run it: no check
        self._log(name, args, kwargs, None)

    def _log(self, name: str, args, kwargs, error: str | None) -> None:
        if self.reads is None:
            return
        from mixfx.analysis.locality import _call_site

        path, line, function = _call_site()
        site = f"{function} ({path.rsplit('/', 2)[-1] if path else '?'}:{line})"
        n = self.counts.get((site, name), 0)
        self.counts[(site, name)] = n + 1
        tensors = _tensor_leaves(args, kwargs)
        index = [self.values[id(t)][1] if t.is_meta else t for t in tensors if self._known(t)]
        index = [t for t in index if not t.is_floating_point() and t.dtype != torch.bool and t.numel()]
        table = tuple(tuple(int(s) for s in t.shape) for t in tensors if not self._known(t))
        low = min((int(t.min()) for t in index), default=None)
        high = max((int(t.max()) for t in index), default=None)
        self.reads.append(IndexRead(self.input_shape, site, name, table, low, high, n,
                                    error.strip().splitlines()[0][:200] if error else None))


# ----------------------------------------------------------------------------- bounds
def size_dependent(reads: Sequence[IndexRead]) -> list[IndexRead]:
    """Reads whose index range changes with the input size while what they index does not (or
    that went out of bounds): the ones a size can break."""
    by_key: dict[tuple, list[IndexRead]] = {}
    for r in reads:
        by_key.setdefault(r.key, []).append(r)
    out = []
    for group in by_key.values():
        if any(r.error for r in group):
            out.append(next(r for r in group if r.error))
            continue
        tables = {r.table for r in group}
        ranges = {(r.low, r.high) for r in group if r.high is not None}
        if len(tables) == 1 and len(ranges) > 1:
            out.append(group[0])
    return out


@dataclass
class IndexBound:
    """The largest size of one spatial dim (the others at the example) at which every index read
    stays in bounds."""

    dim: str
    largest: int  # runs here
    smallest_failing: int  # fails here with `error`
    error: str
    module: str | None = None  # the module running when it failed
    site: str | None = None  # the model's code that made the read: "function (file:line)"
    probes: int = 0

    @property
    def exact(self) -> bool:
        return self.smallest_failing == self.largest + 1

    def text(self) -> str:
        where = (f" at `{self.module}`" if self.module
                 else f" in `{self.site.split(' ')[0]}`" if self.site else "")
        if self.exact:
            return f"{self.dim} <= {self.largest} (index bound{where})"
        return f"{self.dim} < {self.smallest_failing} (index bound{where}; runs at {self.largest})"

    def failure(self) -> str:
        where = ", ".join(f"`{w}`" for w in (self.module, self.site) if w)
        return f"at {self.dim} = {self.smallest_failing}{f' ({where})' if where else ''}: {self.error}"


def note(bounds: Sequence[IndexBound]) -> str:
    """One paragraph for the report's notes: what the bounds are and why a meta run misses them."""
    return ("Index bounds: " + ", ".join(f"{b.dim} <= {b.largest}" if b.exact else f"{b.dim} < {b.smallest_failing}"
                                         for b in bounds)
            + ". An index op reads a fixed-size table at indices computed from the input size, and fails past "
            "it (" + "; ".join(b.failure() for b in bounds) + "). Meta tensors carry no index values: mixfx "
            "computes such indices for real to find these.")


Verdict = Callable[[tuple[int, ...]], Any]  # size -> a probe (ok, error, module)


def find_bounds(probe: Verdict, example: Sequence[int], names: Sequence[str], *, max_scale: int = 16,
                max_probes: int = 24) -> list[IndexBound]:
    """Per spatial dim, the largest size that runs where a larger one fails past an index bound:
    doubling from the example, then bisection (exact when the sizes in between run or fail on
    the index alone). `probe(shape)` is the eager model's size probe."""
    example = tuple(int(s) for s in example)
    bounds: list[IndexBound] = []
    for i, name in enumerate(names):
        count = 0

        sites: dict[int, str] = {}

        def at(size: int):
            nonlocal count
            shape = list(example)
            shape[2 + i] = size
            count += 1
            with collect() as reads:
                p = probe(tuple(shape))
            site = next((r.site for r in reads if r.error), None)
            if site:
                sites[size] = site
            if p.ok:
                return True, p
            return (False if is_bound_error(p.error) else None), p

        lo, hi, failing = example[2 + i], None, None
        size = lo
        while size < example[2 + i] * max_scale and count < max_probes:
            size *= 2
            ok, p = at(size)
            if ok is False:
                hi, failing = size, p
                break
            if ok:
                lo = size
        if hi is None:
            continue
        unknown: set[int] = set()
        while hi - lo > 1 and count < max_probes:
            inside = [s for s in range(lo + 1, hi) if s not in unknown]
            if not inside:
                break
            mid = min(inside, key=lambda s: abs(s - (lo + hi) // 2))
            ok, p = at(mid)
            if ok is False:
                hi, failing = mid, p
            elif ok:
                lo = mid
            else:
                unknown.add(mid)  # fails for another reason (divisibility): look beside it
        bounds.append(IndexBound(name, lo, hi, failing.error or "", failing.module, sites.get(hi), count))
    return bounds


def sizes_within(example: Sequence[int], bounds: Sequence[IndexBound], names: Sequence[str],
                 limit: int = 8) -> list[tuple[int, ...]]:
    """Other sizes for the size search that keep every bound: below the largest size of each
    bounded dim, on multiples of common strides, H != W."""
    example = tuple(int(s) for s in example)
    top = [min(example[2 + i], next((b.largest for b in bounds if b.dim == n), example[2 + i]))
           for i, n in enumerate(names)]
    out: list[tuple[int, ...]] = []
    for m in (32, 16, 8, 4, 2, 1):
        for factors in ((1.0, 0.875), (0.875, 1.0), (0.75, 0.625), (0.625, 0.75)):
            dims = [max(m, math.floor(t * factors[i % 2] / m) * m) for i, t in enumerate(top)]
            shape = (*example[:2], *dims)
            if shape == example or any(d < 2 for d in dims) or (len(dims) > 1 and len(set(dims)) < len(dims)):
                continue
            if shape not in out:
                out.append(shape)
    return out[:limit]


_TEXT = re.compile(r"^(\w+) (<=|<) (\d+) \(index bound")


def upper_bounds(constraints: Sequence[str]) -> dict[str, int]:
    """The largest size per dim that the index bounds among a report's constraints allow."""
    out: dict[str, int] = {}
    for text in constraints:
        m = _TEXT.match(text)
        if m:
            largest = int(m.group(3)) - (m.group(2) == "<")
            out[m.group(1)] = min(largest, out.get(m.group(1), largest))
    return out
