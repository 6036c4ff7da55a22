"""Ground truth for mixfx's verdicts, written apart from the analyser (issue 13, item 9).

Nothing here imports mixfx: the oracles use torch and the eager model only, so a wrong idea in the
analyser cannot be repeated in the check of it.

- `size_search`: is the model `fixed`? Forward the eager model at many candidate sizes (H != W,
  never 1; multiples of 7, 8, 14, 16, 32, 7*32, ... and nearby sizes, smaller and larger than the
  example, including sizes with the example's pixel count). Meta-device forwards first (they cost
  milliseconds); a size that runs there is confirmed by a real forward where affordable, because
  meta tensors do not check index bounds. `fixed` iff no size other than the example runs.
- `perturbation_probe`: local or global? On an input wider than the receptive field, perturb a
  strip at the left end and a strip at the right end, and see whether any element of the pre-head
  map changes under both (the far end of the map changes when the near end is perturbed). A
  bounded receptive field keeps the two sets apart; global mixing (attention, scans, FFT) and
  global context (SE gates, GroupNorm statistics) join them. The pre-head map is found by size:
  the last tensor a torch call returns whose shape varies with the input size (two meta runs);
  for a dense-prediction net that is the output itself. float64, eval mode, random weights, with
  zero-initialised parameters (timm's zero-init residual branches) given random values so that no
  branch is invisible.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Size = tuple[int, ...]  # spatial sizes only: (H, W), or (L,), (D, H, W)

# Multiples the candidate sizes are rounded to: patch sizes (7, 8, 14, 16, ...), total strides
# (32, 64, ...) and window x stride products (7*8, 7*16, 7*32, ...).
MULTIPLES = (1, 7, 8, 12, 14, 16, 24, 28, 32, 48, 56, 64, 96, 112, 128, 192, 224, 256)
# Per-axis scale factors (H, W) of the candidates: smaller and larger, aspect changes, and the
# two that keep the pixel count (a token MLP over H*W/p^2 positions runs there).
FACTORS = ((1.25, 0.875), (0.75, 1.125), (0.5, 2.0), (2.0, 0.5), (1.5, 1.25), (0.5, 0.75),
           (1.125, 1.5), (0.625, 0.5), (2.0, 2.5))
# Odd offsets from the example: they run when no divisibility constraint holds.
NEARBY = ((1, 3), (-3, 5), (2, -1), (0, 1), (5, 0))
# Multiples the example shrinks by (H - m x W - 2m): a model that indexes a fixed-size table with
# positions (relative-position tables) runs only up to its size.
SHRINK = (32, 16, 14)
# Whole multiples of the example per axis: they keep every divisibility it has, whatever modulus
# (maxvit_*_tf_512 runs only at multiples of 512, more than any of MULTIPLES).
WHOLE_MULTIPLES = ((2, 1), (1, 2), (2, 3))


def _short(exc: BaseException, n: int = 160) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:n]


def _fmt(size: Size) -> str:
    return "x".join(map(str, size))


def candidate_sizes(example: Size, limit: int = 96) -> list[Size]:
    """Sizes to try besides `example`: never a size of 1, never two equal spatial sizes (H != W,
    so that a model that only works on squares, or confuses H and W, is seen), at most `limit`:
    the example less 32 x 64 first, the nearby odd sizes, smaller ones, then by distance from the
    example's pixel count."""
    nd = len(example)
    out: list[Size] = []

    def add(size: Iterable[int]) -> None:
        s = tuple(int(v) for v in size)
        if any(v <= 1 for v in s) or s == tuple(example):
            return
        if nd >= 2 and len(set(s)) < nd:
            return
        if s not in out:
            out.append(s)

    for m in SHRINK[:1]:  # smaller on every axis: the likeliest to run when anything does
        add(max(m, e - m * (1 + i % 2)) for i, e in enumerate(example))
    for off in NEARBY:
        add(e + off[i % 2] for i, e in enumerate(example))
    for m in SHRINK[1:]:  # a model that indexes a fixed-size table runs only up to its size
        add(max(m, e - m * (1 + i % 2)) for i, e in enumerate(example))
    for fac in WHOLE_MULTIPLES:  # meet any divisibility the example meets (a window of 16 at
        add(e * fac[i % 2] for i, e in enumerate(example))  # stride 32: H % 512 == 0)
    pixels = math.prod(example)
    per_multiple: list[list[Size]] = []
    for m in MULTIPLES[1:]:
        grid = []
        for fac in FACTORS:
            s = [max(m, m * round(fac[i % 2] * e / m)) for i, e in enumerate(example)]
            if nd >= 2 and len(set(s)) < nd:  # equal sizes: move the last axis by one multiple
                s[-1] += m
            grid.append(tuple(s))
        for i in range(nd):  # one axis at a time, by one multiple
            s = list(example)
            s[i] = max(m, m * round(example[i] / m) + m)
            grid.append(tuple(s))
        grid.sort(key=lambda s: (abs(math.log(math.prod(s) / pixels)), s))
        per_multiple.append(grid)
    # round robin over the multiples, so that a strong constraint (H % 224 == 0) is met early
    # even when the sweep stops before the end of the list
    for rank in range(max(map(len, per_multiple))):
        for grid in per_multiple:
            if rank < len(grid):
                add(grid[rank])
    return out[:limit]


def meta_copy(model: nn.Module) -> nn.Module:
    """The model on the meta device (weights dropped, structure kept): forwards compute nothing."""
    return copy.deepcopy(model).to("meta").eval()


def _forward(model: nn.Module, shape: Size, device: str, dtype=torch.float32, seed: int = 0) -> Any:
    if device == "meta":
        x = torch.empty(shape, device="meta", dtype=dtype)
    else:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    with torch.no_grad():
        return model(x)


# ----------------------------------------------------------------------------- (a) size search
def _roundings(s: int) -> list[Callable[[int], int]]:
    """Ways a stack of strided layers of total stride `s` rounds a size: floor or ceil (padded
    stems) in one step, or in two steps a * b = s each rounding its own way (a "same"-padded
    stride-4 stem, ceil, then an 8x8 patchify, floor: R+ViT hybrids)."""
    floor = lambda a: (lambda v: v // a)  # noqa: E731
    ceil = lambda a: (lambda v: -(-v // a))  # noqa: E731
    out = [floor(s), ceil(s)]
    for a in (2, 4, 8, 16):
        if s % a == 0 and 1 < s // a:
            for first in (floor(a), ceil(a)):
                for then in (floor(s // a), ceil(s // a)):
                    out.append(lambda v, f=first, g=then: g(f(v)))
    return out


@dataclass
class SizeSearch:
    """What ran where. `runs` holds the sizes besides the example that ran (confirmed by a real
    forward where one was allowed); `meta_runs` every size a meta forward accepted; `refuted`
    sizes a meta forward accepted and a real forward did not (index bounds)."""

    example: Size
    tried: list[Size] = field(default_factory=list)
    runs: list[Size] = field(default_factory=list)
    meta_runs: list[Size] = field(default_factory=list)
    refuted: dict[Size, str] = field(default_factory=dict)
    fails: dict[Size, str] = field(default_factory=dict)
    confirmed_real: bool = False  # "runs" was confirmed by real forwards
    meta_usable: bool = True  # the meta forward ran at the example size
    example_error: str | None = None  # the example itself failed (nothing can be judged)
    stopped_early: bool = False  # the meta sweep ran out of its time budget
    seconds: float = 0.0

    @property
    def fixed(self) -> bool | None:
        """True iff no size runs on which the model's tensors could differ from the example's:
        no other size runs, or every one that does keeps the example's count of positions (a
        token MLP over 196 patches runs at 112x448 for 224x224) or falls on its grid (only the
        remainder pixels a patchify drops differ). None when undecided (the example fails, or
        the sweep ran out of time before any size ran)."""
        if self.example_error or (self.stopped_early and not self.runs):
            return None
        pinned = not self.runs or self.same_count_only or self.grid_stride is not None
        if pinned and self.stopped_early:  # only the sizes on its grid were tried: undecided
            return None
        return pinned

    @property
    def divisors(self) -> Size:
        """Per spatial axis, the gcd of the example and every size that ran: an upper bound of
        the divisibility the model needs (1 when the nearby odd sizes ran)."""
        sizes = [self.example, *self.runs]
        return tuple(math.gcd(*(s[i] for s in sizes)) for i in range(len(self.example)))

    @property
    def count_stride(self) -> int | None:
        """The smallest stride s at which every size that ran has the example's number of
        positions (prod(size // s)) on another grid: a fixed count of positions, e.g. a token MLP
        over 196 patches of 16 px accepts 112x448 for 224x224. None when there is no such s."""
        for s in (1, 2, 4, 7, 8, 14, 16, 28, 32, 56, 64):
            for div in _roundings(s):
                count = math.prod(div(e) for e in self.example)
                grids = [tuple(div(v) for v in size) for size in self.runs]
                # every run keeps the count, and at least two runs do so on another grid
                if (count and all(math.prod(g) == count for g in grids)
                        and sum(g != tuple(div(e) for e in self.example) for g in grids) >= 2):
                    return s
        return None

    @property
    def grid_stride(self) -> int | None:
        """The smallest stride s at which every size that ran falls on the example's own grid
        (per axis, size // s or ceil(size / s) equal to the example's): the model runs at other
        sizes only where the remainder pixels change and the grid does not. None when no common
        stride (2 to 64) does."""
        def same(v: int, e: int, s: int) -> bool:
            return v // s == e // s or -(-v // s) == -(-e // s)

        for s in (2, 4, 7, 8, 14, 16, 28, 32, 56, 64):
            if min(self.example) // s < 2:  # a grid of one cell says nothing
                break
            if self.runs and all(same(v, e, s) for r in self.runs for v, e in zip(r, self.example)):
                return s
        return None

    @property
    def same_count_only(self) -> bool:
        return self.count_stride is not None

    def summary(self, n: int = 6) -> str:
        if self.example_error:
            return f"example {_fmt(self.example)} fails: {self.example_error}"
        how = "real" if self.confirmed_real else "meta"
        runs = ", ".join(map(_fmt, self.runs[:n])) + (" ..." if len(self.runs) > n else "")
        return (f"{len(self.runs)}/{len(self.tried)} other sizes run ({how}): {runs or 'none'}; "
                f"divisors {_fmt(self.divisors)}" + (f"; {len(self.refuted)} refuted by a real forward"
                                                    if self.refuted else ""))


def size_search(model: nn.Module, example_shape: Size, *, meta_model: nn.Module | None = None,
                real: bool = True, real_confirm: int = 3, candidates: list[Size] | None = None,
                time_budget: float = 20.0, enough_runs: int = 12) -> SizeSearch:
    """Search sizes on which the eager `model` runs. `example_shape` is the full input shape
    (B, C, *spatial). Meta forwards on `meta_model` (a meta copy of `model` when None) sort the
    candidates; with `real`, up to `real_confirm` of those that ran there (smallest first) get a
    real forward, and the first that passes decides `not fixed` (the rest are kept as meta runs).
    When the meta forward fails at the example size (an op without a meta kernel, `.item()`),
    every candidate gets a real forward instead (at most 16, smallest first). Meta forwards are
    not always milliseconds (bicubic resampling decomposes into hundreds of ops): the meta sweep
    stops after `time_budget` seconds, or once `enough_runs` sizes ran, keeping the candidates'
    priority order (a model that fails everywhere fails fast and gets every candidate)."""
    t0 = time.perf_counter()
    lead, example = tuple(example_shape[:2]), tuple(example_shape[2:])
    cands = candidates if candidates is not None else candidate_sizes(example)
    res = SizeSearch(example=example, tried=list(cands))
    meta = meta_model if meta_model is not None else meta_copy(model)

    def runs(size: Size, device: str) -> str | None:
        try:
            _forward(meta if device == "meta" else model, lead + size, device)
            return None
        except Exception as exc:  # noqa: BLE001
            return _short(exc)

    err = runs(example, "meta")
    t_real, slow_meta = 0.0, False
    if err is not None:
        res.meta_usable = False
        if not real:
            res.example_error = f"meta forward failed and no real forward allowed: {err}"
            res.seconds = time.perf_counter() - t0
            return res
    if real:
        t1 = time.perf_counter()
        err = runs(example, "cpu")
        if err is not None:
            res.example_error = err
            res.seconds = time.perf_counter() - t0
            return res
        t_real = time.perf_counter() - t1
    t_sweep = time.perf_counter()  # the budget is the sweep's: a large example may take seconds
    if res.meta_usable:
        for s in cands:
            if time.perf_counter() - t_sweep > time_budget:
                res.tried = res.tried[:len(res.meta_runs) + len(res.fails)]
                res.stopped_early = True
                break
            if len(res.meta_runs) >= enough_runs:  # enough to judge, derive divisors and probe
                res.tried = res.tried[:len(res.meta_runs) + len(res.fails)]
                break
            t1 = time.perf_counter()
            e = runs(s, "meta")
            if (real and not res.meta_runs and not res.fails
                    and time.perf_counter() - t1 > max(1.0, 2 * t_real)):
                # a meta forward slower than a real one (recurrent layers decompose step by step
                # on meta) would spend the budget on a few sizes: sweep with real forwards
                res.meta_usable, slow_meta = False, True
                break
            if e is None:
                res.meta_runs.append(s)
            else:
                res.fails[s] = e
    if res.meta_usable:
        if not real:
            res.runs = list(res.meta_runs)
            res.seconds = time.perf_counter() - t0
            return res
        # confirm the cheapest meta runs with real forwards, until one passes
        res.confirmed_real = True
        by_cost = sorted(res.meta_runs, key=lambda s: (any(a > b for a, b in zip(s, example)),
                                                        math.prod(s)))
        for s in by_cost[:real_confirm]:
            e = runs(s, "cpu")
            if e is None and all(a >= b for a, b in zip(s, example)):
                e = _extra_pixels_ignored(model, lead, example, s)
            if e is None:
                res.runs.append(s)
                break
            res.refuted[s] = e
        if res.runs:  # the rest count as runs too (divisors, probe sizes), minus those refuted
            res.runs += [s for s in res.meta_runs if s not in res.runs and s not in res.refuted]
    else:
        res.confirmed_real = True
        # in the candidates' priority order when meta was only slow, else cheapest first
        for s in (cands if slow_meta else sorted(cands, key=math.prod))[:16]:
            if time.perf_counter() - t_sweep > time_budget and res.runs:
                res.stopped_early = True
                break
            e = runs(s, "cpu")
            if e is None:
                res.runs.append(s)
            else:
                res.fails[s] = e
    res.seconds = time.perf_counter() - t0
    return res


def _extra_pixels_ignored(model: nn.Module, lead: Size, example: Size, size: Size) -> str | None:
    """A size at least the example's on every axis "runs" trivially when the model never reads
    the extra pixels (a stride-16 patchify floors 225x227 to the 224x224 grid): then it did not
    process another size. Changing only those pixels must change the output; None when it does,
    the reason when it does not."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(lead + size, generator=gen)
    y = x.clone()
    inside = tuple(slice(0, e) for e in example)
    noise = torch.randn(y.shape, generator=gen) * 3.0
    noise[(..., *inside)] = 0.0
    y += noise
    with torch.no_grad():
        a, b = _tensors(model(x)), _tensors(model(y))
    if all(torch.equal(u, v) for u, v in zip(a, b)):
        return "runs, but never reads the pixels beyond the example's size (same as the example)"
    return None


# ----------------------------------------------------------------------------- call recording
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _func_name(func: Callable) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{getattr(func, '__module__', None) or ''}.{name}"


class _CallRecorder(TorchFunctionMode):
    """Every outermost torch call of a forward (functions, Tensor methods, inside every module),
    keyed by `name#occurrence`, with the module path it ran in. Records shapes, or captures one
    key's tensor (`want`)."""

    def __init__(self, model: nn.Module, want: str | None = None) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.order: list[str] = []
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.where: dict[str, str] = {}
        self.want = want
        self.captured: torch.Tensor | None = None
        self._stack: list[str] = []
        self._handles = []
        for name, mod in model.named_modules():
            self._handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self._handles.append(mod.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(mod, args) -> None:
            self._stack.append(name)
        return hook

    def _leave(self, mod, args, output) -> None:
        if self._stack:
            self._stack.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ts = _tensors(out)
        if ts:
            where = self._stack[-1] if self._stack else ""
            name = f"{_func_name(func)}@{where}"  # a branch shifts the counts of one module only
            n = self.counts.get(name, 0)
            self.counts[name] = n + 1
            key = f"{name}#{n}"
            self.order.append(key)
            self.shapes[key] = [tuple(t.shape) for t in ts]
            self.where[key] = where
            if key == self.want:
                self.captured = torch.cat([t.detach().reshape(-1).clone() for t in ts])
        return out


def record_calls(model: nn.Module, shape: Size, device: str = "meta", want: str | None = None,
                 dtype=torch.float32, x: torch.Tensor | None = None) -> _CallRecorder:
    if x is None:
        x = torch.empty(shape, device="meta", dtype=dtype) if device == "meta" else torch.randn(shape, dtype=dtype)
    rec = _CallRecorder(model, want)
    try:
        with torch.no_grad(), rec:
            model(x)
    finally:
        rec.remove()
    return rec


def pre_head_key(meta: nn.Module, shape_a: Size, shape_b: Size) -> tuple[str | None, _CallRecorder]:
    """The key of the last torch call whose output shape differs between two input sizes: the
    pre-head map (a classifier's last spatial tensor; a dense net's output)."""
    ra = record_calls(meta, shape_a)
    rb = record_calls(meta, shape_b)
    return _last_varying(ra, rb), ra


def _last_varying(ra: _CallRecorder, rb: _CallRecorder) -> str | None:
    key = None
    for k in ra.order:
        if k in rb.shapes and rb.shapes[k] != ra.shapes[k]:
            key = k
    return key


def receptive_field_estimate(model: nn.Module, shape: Size) -> int:
    """An independent estimate of the receptive field along the last axis, in input pixels:
    1 + sum over conv/pool module calls of (kernel - 1) * dilation * (input size / the call's
    input size), counting only calls whose input width follows the input's (a conv over a fixed
    7x7 attention map, or a Conv1d over channels, is not a spatial kernel). Summing over every
    call (not the longest path) overestimates on branching nets, which only asks for a wider
    probe; kernels outside modules and window attention are not counted."""
    def calls(size: Size) -> dict[tuple[str, int], tuple[int, int, int]]:
        seen: dict[tuple[str, int], tuple[int, int, int]] = {}
        counts: dict[str, int] = {}
        handles = []

        def make(name: str):
            def hook(mod, args) -> None:
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if x is None or x.dim() != len(size) or x.shape[-1] <= 0:
                    return
                k = mod.kernel_size
                k = k[-1] if isinstance(k, (tuple, list)) else k
                d = getattr(mod, "dilation", 1)
                d = d[-1] if isinstance(d, (tuple, list)) else (d or 1)
                n = counts.get(name, 0)
                counts[name] = n + 1
                seen[(name, n)] = (int(k), int(d), int(x.shape[-1]))
            return hook

        for name, mod in model.named_modules():
            if hasattr(mod, "kernel_size") and "Adaptive" not in type(mod).__name__:
                handles.append(mod.register_forward_pre_hook(make(name)))
        try:
            _forward(model, size, "meta")
        finally:
            for h in handles:
                h.remove()
        return seen

    wide = calls(shape)
    other = calls((*shape[:-1], 2 * shape[-1]))
    total = 1.0
    for key, (k, d, w_in) in wide.items():
        if key in other and other[key][2] != w_in:
            total += (k - 1) * d * shape[-1] / w_in
    return int(math.ceil(total))


# ----------------------------------------------------------------------------- (b) perturbation probe
@dataclass
class PerturbationProbe:
    """`verdict`: "global" (the far end of the pre-head map changes when the near end of the
    input is perturbed), "local" (it does not), or "inconclusive" (`reason` says why)."""

    verdict: str
    reason: str
    map_key: str | None = None  # the torch call that produced the pre-head map
    map_module: str | None = None  # the module it ran in ("" = the model's own forward)
    probe_size: Size | None = None
    rf_estimate: int | None = None  # px along the probed axis
    map_numel: int = 0
    left_changed: int = 0
    right_changed: int = 0
    both_changed: int = 0
    resizes_input: bool = False  # nothing computed from the input varies with its size
    seconds: float = 0.0

    @property
    def far_end_changes(self) -> bool | None:
        return None if self.verdict == "inconclusive" else self.verdict == "global"


def randomise_zero_parameters(model: nn.Module, seed: int = 1) -> None:
    """timm zero-initialises some residual-branch norms, gates and heads, and starts layer scales
    at 1e-5 or 1e-6: a branch multiplied by zero would hide its mixing from the probe, and one
    multiplied by 1e-6 leaves changes at the far end near float64 round-off (edgenext's XCA:
    5e-16). Parameters that are all zero get small random values; constant-filled ones below
    1e-2 (layer scales) get random values of order 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point() or not p.numel():
                continue
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
            elif p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()) and float(p.abs().max()) < 1e-2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)


def calibrate_norm_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """Batch norms get the statistics of one forward on `x`, as a trained net's are of its data.
    With random weights and the default statistics (mean 0, variance 1) activations grow layer by
    layer and saturate the gates behind them (cspnext's hard sigmoid over the global mean sat at 0
    or 1, so the far end could not change what it gates)."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one forward sets the statistics
        m.train()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for m, momentum in saved:
            m.momentum = momentum
            m.eval()


def _flops(meta: nn.Module, shape: Size) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            _forward(meta, shape, "meta")
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001
        return None


def _round_up(x: float, m: int) -> int:
    return max(m, m * int(math.ceil(x / m)))


def probe_sizes(search: SizeSearch, needed: int) -> list[Size]:
    """Wide inputs to try, in order: the last axis from max(2 * `needed`, 4x the example's) down
    to `needed` by halves (rounded up to the divisor the search found), the first axis as small
    as the search allows; then narrower ones (disjoint ends there still prove locality); then the
    sizes that ran, widest aspect first."""
    ex = search.example
    div = search.divisors
    small = min([s[0] for s in (ex, *search.runs)] + [_round_up(32, div[0])])
    heights = sorted({_round_up(8, div[0]), _round_up(16, div[0]), small, _round_up(2 * small, div[0]), ex[0]})
    heights = [h for h in heights if h > 1][:4]
    widths = []
    w = max(2 * needed, 4 * ex[-1])
    while w >= needed or len(widths) < 3:
        widths.append(_round_up(w, div[-1]))
        if w < ex[-1]:
            break
        w //= 2
    out: list[Size] = []
    for w in widths:
        for h in heights:
            s = (h, *ex[1:-1], w)
            if s not in out and (len(s) < 2 or len(set(s)) == len(s)):
                out.append(s)
    for s in sorted([ex, *search.runs], key=lambda s: -s[-1] / s[0]):
        if s not in out:
            out.append(s)
    return out


def global_width(rf: int, strip: int = 8) -> int:
    """The width from which overlapping ends mean global: twice what a bounded field of `rf`
    pixels needs to keep the ends apart. The margin covers what the estimate misses (window
    attention, kernels outside modules): tiny_vit_5m_224 (estimate 431 px) overlaps at 894 px
    and keeps its ends apart at 1788 px."""
    return 2 * (2 * rf + 2 * strip + 16)


def perturbation_probe(model: nn.Module, example_shape: Size, search: SizeSearch, *,
                       meta_model: nn.Module | None = None, flop_budget: float = 6e9,
                       strip: int = 8, seed: int = 0) -> PerturbationProbe:
    """Perturb a `strip`-pixel band at the left end and one at the right end of the widest
    affordable input (the last axis; meta FLOP count <= `flop_budget`), and compare the element
    sets of the pre-head map each changes (float64, eval). Disjoint sets: local (at any width).
    Overlapping sets at a width of at least `global_width` (four times the receptive field
    estimate and a margin): global. Otherwise inconclusive."""
    t0 = time.perf_counter()
    lead, ex = tuple(example_shape[:2]), tuple(example_shape[2:])
    meta = meta_model if meta_model is not None else meta_copy(model)
    out = PerturbationProbe("inconclusive", "")

    def done(verdict: str, reason: str) -> PerturbationProbe:
        out.verdict, out.reason = verdict, reason
        out.seconds = time.perf_counter() - t0
        return out

    if search.example_error:
        return done("inconclusive", "the example size does not run")
    if not search.runs:
        return done("inconclusive", "runs at the example size only: the pre-head map cannot be found by size")
    # the size that differs most from the example on every axis (nearby sizes may floor to the
    # example's grid and leave every inner tensor the same size)
    other = max(search.runs, key=lambda s: min(abs(math.log(a / b)) for a, b in zip(s, ex)))
    try:
        key, rec = pre_head_key(meta, lead + ex, lead + other)
    except Exception as exc:  # noqa: BLE001
        return done("inconclusive", f"meta forward failed while finding the pre-head map: {_short(exc, 100)}")
    if key is None:
        out.resizes_input = True
        return done("inconclusive", "no call's output varies with the input size (the input is resized "
                                    "to a constant size first)")

    # the receptive field estimate decides how wide the probe must be
    div = search.divisors
    rf = None
    ref = None
    for cand in ((max(8, _round_up(32, div[0])), *ex[1:-1], _round_up(2 * ex[-1], div[-1])), ex):
        try:
            rf = receptive_field_estimate(meta, lead + cand)
            ref = cand
            break
        except Exception:  # noqa: BLE001
            continue
    needed = 2 * (rf or 1) + 2 * strip + 16  # wider than this, a bounded field keeps the ends apart
    ref_flops = _flops(meta, lead + ref) if ref is not None else None

    # the widest affordable size that runs on meta; the pre-head map is then found again between
    # it and a narrower input of the same height, so that both runs take the same branches (a
    # model may skip work at its default size, e.g. timm's position-embedding resampling)
    chosen = None
    for s in probe_sizes(search, needed):
        if s[-1] < 2 * strip + 2:
            continue
        if ref_flops and ref_flops * math.prod(s) / math.prod(ref) > flop_budget:
            continue  # linear estimate: over budget already
        fl = _flops(meta, lead + s)
        if fl is None or fl > flop_budget:
            continue
        try:
            r = record_calls(meta, lead + s)
        except Exception:  # noqa: BLE001
            continue
        # a model that only runs at its count of positions has no such pair: its tensors after
        # the count is fixed keep one shape, and the last one that varies (the stem) would say
        # nothing about the mixing after it
        narrower = (*s[:-1], _round_up(0.75 * s[-1], div[-1]))
        if narrower == s:
            continue
        try:
            r2 = record_calls(meta, lead + narrower)
        except Exception:  # noqa: BLE001
            continue
        k2 = _last_varying(r, r2)
        if k2 is None:
            out.resizes_input = True
            return done("inconclusive", f"no call's output differs between {_fmt(s)} and "
                                        f"{_fmt(narrower)} (the input is resized to a constant size first)")
        key, rec, chosen = k2, r, s
        break
    if chosen is None:
        return done("inconclusive", f"no two widths of one height run within {flop_budget / 1e9:g} GFLOP "
                                    f"and {needed} px")
    out.map_key, out.map_module = key, rec.where.get(key, "")
    out.probe_size = chosen
    out.rf_estimate = rf

    real = copy.deepcopy(model).double().eval()
    randomise_zero_parameters(real)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(lead + chosen, generator=gen, dtype=torch.float64)
    try:
        calibrate_norm_statistics(real, x)
    except Exception:  # noqa: BLE001  (one value per channel somewhere: keep the defaults)
        real = copy.deepcopy(model).double().eval()
        randomise_zero_parameters(real)
    xl, xr = x.clone(), x.clone()
    xl[..., :strip] += 3.0 * torch.randn(xl[..., :strip].shape, generator=gen, dtype=torch.float64)
    xr[..., -strip:] += 3.0 * torch.randn(xr[..., -strip:].shape, generator=gen, dtype=torch.float64)
    maps = []
    try:
        for inp in (x, xl, xr):
            r = record_calls(real, lead + chosen, device="cpu", want=key, x=inp)
            if r.captured is None:
                return done("inconclusive", f"the real forward at {_fmt(chosen)} has no call {key}")
            maps.append(r.captured)
    except Exception as exc:  # noqa: BLE001
        return done("inconclusive", f"real forward at {_fmt(chosen)} failed: {_short(exc, 100)}")
    base, left, right = maps
    if left.shape != base.shape or right.shape != base.shape:
        return done("inconclusive", "the pre-head map's size depends on the input values")
    tol = 1e-12 * (1.0 + float(base.abs().max()))
    dl = (left - base).abs() > tol
    dr = (right - base).abs() > tol
    out.map_numel = base.numel()
    out.left_changed, out.right_changed = int(dl.sum()), int(dr.sum())
    out.both_changed = int((dl & dr).sum())
    where = f"{key} in `{out.map_module or 'forward'}`"
    if not out.left_changed or not out.right_changed:
        return done("inconclusive", f"a perturbed end does not reach the pre-head map ({where})")
    if out.both_changed == 0:
        return done("local", f"at {_fmt(chosen)} the ends of the pre-head map ({where}) change apart: "
                             f"{out.left_changed} and {out.right_changed} of {out.map_numel} elements")
    if rf is None or chosen[-1] < global_width(rf, strip):
        return done("inconclusive", f"the ends overlap at {_fmt(chosen)}, narrower than four times the "
                                    f"receptive field estimate ({out.rf_estimate} px)")
    return done("global", f"at {_fmt(chosen)} (receptive field estimate {out.rf_estimate} px) perturbing "
                          f"either end changes {out.both_changed} of the same {out.map_numel} elements "
                          f"of the pre-head map ({where})")
