"""Which other input sizes does the eager model accept? Fixed means fixed.

Two sizes that fail prove nothing when an unseen divisibility constraint is the cause (a windowed
model needs H % 256 == 0; 280x168 breaks it), and a traced or exported graph may be specialised
to the example size. So every "does it run at this size" question is asked of the *eager model*,
on meta tensors (milliseconds: no compute, no weight memory; a real forward only where meta
tensors cannot run and the weights are real), over a list of candidates built from common strides
and windows: the example +-32/16/8, x1.5, x2, multiples of 7*32 and 14*16, never size 1, H != W.
A model is `fixed` only when none of them runs, also at square sizes: a model that takes a grid's
side from a token count (`int(sqrt(N))`) runs at square sizes only, which is a constraint (`H == W`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from mixfx.analysis.nodes import global_module_hooks
from mixfx.shapes import classify_exception, eager_meta_forward, flatten_outputs


@dataclass
class Probe:
    """One eager forward at `input_shape`."""

    input_shape: tuple[int, ...]
    ok: bool
    error: str | None = None
    module: str | None = None  # innermost module running when it failed
    kind: str | None = None  # classify_exception's kind of the failure
    real: bool = False  # ran on real tensors (meta could not)
    out_shapes: list[tuple[int, ...]] = field(default_factory=list)  # of every tensor output


@dataclass
class SizeSearch:
    example: tuple[int, ...]
    probes: list[Probe] = field(default_factory=list)
    # no size with H != W ran, square ones did (`H == W` is required): set by `search`
    square_only: bool = False
    expect_batch: int | None = None  # every output's leading dim at the example: the batch

    @property
    def running(self) -> list[tuple[int, ...]]:
        return [p.input_shape for p in self.probes if p.ok and p.input_shape != self.example]

    def probe_at(self, shape: Sequence[int]) -> Probe | None:
        return next((p for p in self.probes if p.input_shape == tuple(shape)), None)


@contextlib.contextmanager
def _module_tracker(model: nn.Module, stack: list[str]) -> Iterator[None]:
    names = {id(m): name for name, m in model.named_modules()}

    def pre(mod, args):
        if id(mod) in names:
            stack.append(names[id(mod)])

    def post(mod, args, out):
        if id(mod) in names and stack:
            stack.pop()

    with global_module_hooks(pre, post):
        yield


def _has_real_weights(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and not any(t.is_meta for t in tensors)


# parameters x input pixels under which a real forward confirms a meta one: ~0.1 s on a CPU core
REAL_FORWARD_LIMIT = 2_000_000 * 64 * 64


def probe(model: nn.Module, shape: Sequence[int], dtype: torch.dtype = torch.float32,
          confirm: bool = False, expect_batch: int | None = None) -> Probe:
    """Run the eager model once at `shape`; never raises. On meta tensors first; where the model
    has real weights and the forward is affordable (or `confirm`: whatever it costs), a meta run
    that succeeds is confirmed by a real one (meta tensors do not check index bounds: a position
    table indexed past its end "runs"), and one that cannot run on meta tensors is replaced by it.
    With `expect_batch` (the outputs' leading dim at the example is the batch), a forward whose
    outputs lead with another size does not run: a `view(-1, C, 14, 14)` put the size change into
    the batch."""
    got = _probe(model, shape, dtype, confirm)
    if got.ok and expect_batch is not None and any(o and o[0] != expect_batch for o in got.out_shapes):
        lead = next(o[0] for o in got.out_shapes if o and o[0] != expect_batch)
        return Probe(got.input_shape, False, f"the output's batch dim is {lead}, not {expect_batch}: a view with -1 "
                     "took the size change into the batch", None, "shape", got.real, got.out_shapes)
    return got


def _probe(model: nn.Module, shape: Sequence[int], dtype: torch.dtype, confirm: bool) -> Probe:
    shape = tuple(int(s) for s in shape)
    stack: list[str] = []
    try:
        with _module_tracker(model, stack):
            out = eager_meta_forward(model, shape, dtype)
        meta = Probe(shape, True, out_shapes=[tuple(int(d) for d in t.shape) for t in flatten_outputs(out)])
    except Exception as exc:  # noqa: BLE001 - a failure is the finding
        meta = Probe(shape, False, _short(exc), stack[-1] if stack else None, classify_exception(exc))
        if meta.kind not in ("data_dependent", "unsupported"):
            return meta
    if not (_affordable(model, shape) or confirm and _has_real_weights(model)):
        return meta
    stack.clear()
    try:
        with _module_tracker(model, stack), torch.no_grad():
            out = model(torch.randn(shape, dtype=dtype))
        return Probe(shape, True, real=True, out_shapes=[tuple(int(d) for d in t.shape) for t in flatten_outputs(out)])
    except Exception as exc:  # noqa: BLE001
        return Probe(shape, False, _short(exc), stack[-1] if stack else None, classify_exception(exc), True)


def _affordable(model: nn.Module, shape: Sequence[int]) -> bool:
    if not _has_real_weights(model):
        return False
    pixels = 1
    for s in shape[2:]:
        pixels *= s
    return sum(p.numel() for p in model.parameters()) * pixels <= REAL_FORWARD_LIMIT


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _round(v: float, m: int) -> int:
    return max(m, int(round(v / m)) * m)


def candidates(example: Sequence[int]) -> list[tuple[int, ...]]:
    """Other sizes to try, in order: near the example on multiples of common strides, then
    scaled by 1.5 and 2 (windowed models need multiples of their window x stride), H != W."""
    spatial = [int(s) for s in example[2:]]
    if not spatial:
        return []
    out: list[tuple[int, ...]] = []

    def add(dims: Sequence[int]) -> None:
        dims = [int(d) for d in dims]
        if any(d < 2 for d in dims) or dims == spatial:
            return
        if any(0 < abs(d - s) < max(2, s // 8) for d, s in zip(dims, spatial)):
            return  # a size next to the example rounds to the same grid (65//2 == 64//2): proves nothing
        if len(dims) > 1 and len(set(dims)) < len(dims):
            return  # H != W: equal sizes can hide a transposed dim
        shape = (*example[:2], *dims)
        if shape not in out:
            out.append(shape)

    def alternate(f: Callable[[int, int], int]) -> list[int]:
        return [f(s, i) for i, s in enumerate(spatial)]

    for m in (32, 16, 8, 4, 2):
        if min(spatial) >= 2 * m or m == 2:
            add(alternate(lambda s, i: _round(s * (1.25 if i % 2 == 0 else 0.875), m)))
            add(alternate(lambda s, i: _round(s * (0.75 if i % 2 == 0 else 1.125), m)))
    add(alternate(lambda s, i: s * 2 if i % 2 == 0 else s))
    add(alternate(lambda s, i: s if i % 2 == 0 else s * 2))
    add(alternate(lambda s, i: s * 3 // 2 if i % 2 == 0 else s))
    add(alternate(lambda s, i: s * 2 if i % 2 == 0 else s * 3))
    add(alternate(lambda s, i: s + 7 * 32 if i % 2 == 0 else s))
    add(alternate(lambda s, i: s + 14 * 16 if i % 2 == 0 else s))
    add(alternate(lambda s, i: s * 2))  # rank 3: the only other size
    return out


def search(model: nn.Module, example: Sequence[int], *, want: int = 2, max_probes: int = 10,
           prefer: Callable[[tuple[int, ...]], bool] | None = None, expect_batch: int | None = None) -> SizeSearch:
    """Probe candidate sizes until `want` of them run (or `max_probes` were tried). Candidates
    that satisfy `prefer` (the symbolic constraints, when known) go first."""
    result = SizeSearch(tuple(int(s) for s in example), expect_batch=expect_batch)
    cands = candidates(example)
    if prefer is not None:
        cands = [c for c in cands if _safe(prefer, c)] + [c for c in cands if not _safe(prefer, c)]
    for shape in cands[:max_probes]:
        result.probes.append(probe(model, shape, expect_batch=expect_batch))
        if len(result.running) >= want:
            break
    if not result.running:
        _search_square(model, example, result)
    return result


def _search_square(model: nn.Module, example: Sequence[int], result: SizeSearch) -> None:
    """No size with H != W ran: does a square one? Each is confirmed by a real forward whatever it
    costs (a meta run misses an index past a table's end, which no H != W size reached); the first
    that runs, or fails for real, ends the search (one is enough: real forwards at x2, x3
    cost). Where one runs, the x2 by x3 size (every divisibility the example meets, sides apart)
    tells a square requirement from a divisibility the nearby sizes missed: a real one too."""
    for shape in square_candidates(example):
        got = probe(model, shape, confirm=True, expect_batch=result.expect_batch)
        result.probes.append(got)
        if got.ok or got.real:
            break
    if not result.running:
        return
    apart = (*example[:2], *(s * (2 + i) for i, s in enumerate(example[2:])))
    result.probes.append(probe(model, apart, confirm=True, expect_batch=result.expect_batch))
    result.square_only = not result.probes[-1].ok


def square_candidates(example: Sequence[int]) -> list[tuple[int, ...]]:
    """For a square example: square sizes, smallest first (x1.5, then x2 and x3, which keep
    every divisibility the example meets). Nothing for a non-square example (it runs with H != W)."""
    spatial = [int(s) for s in example[2:]]
    if len(spatial) < 2 or len(set(spatial)) != 1:
        return []
    side = spatial[0]
    sides = dict.fromkeys((side * 3 // 2, 2 * side, 3 * side))
    return [(*example[:2], *([s] * len(spatial))) for s in sides if s >= 2 and s != side]


def _safe(pred: Callable[[tuple[int, ...]], bool], shape: tuple[int, ...]) -> bool:
    try:
        return bool(pred(shape))
    except Exception:  # noqa: BLE001
        return False


PERIODS = (1, 2, 3, 4, 5, 6, 7, 8, 14, 16, 28, 32, 48, 56, 64, 96, 112, 128, 192, 224, 256, 384, 448, 512)


def divisibility(model: nn.Module, base: Sequence[int], names: Sequence[str], search_result: SizeSearch,
                 max_probes: int = 22) -> list[str]:
    """Per spatial dim, the smallest step from a running size `base` that runs again, with the
    other dims kept: the dim's period ("H % 256 == 0"). Used when the symbolic run could not
    finish and its divisibility guards are missing."""
    texts: list[str] = []
    base = tuple(int(s) for s in base)
    for i, name in enumerate(names):
        probes = 0  # per dim
        for p in PERIODS:
            if probes >= max_probes:
                break
            shape = list(base)
            shape[2 + i] = base[2 + i] + p
            got = search_result.probe_at(shape)
            if got is None:
                got = probe(model, shape, expect_batch=search_result.expect_batch)
                search_result.probes.append(got)
                probes += 1
            if got.ok:
                if p > 1:
                    rem = base[2 + i] % p
                    texts.append(f"{name} % {p} == {rem}")
                break
    return texts
