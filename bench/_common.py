"""Shared helpers for the benchmarks in bench/ (timing, memory, timm model lists, concrete sizes)."""
from __future__ import annotations

import contextlib
import re
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def maxrss_mb() -> float:
    """Peak resident set size of this process so far (MB). Monotonic: step peaks are deltas."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def timed(out: dict, key: str) -> Iterator[None]:
    """Record the wall time (s) and the growth of peak RSS (MB) of the block as out[key_s], out[key_mb]."""
    rss0 = maxrss_mb()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[f"{key}_s"] = round(time.perf_counter() - t0, 4)
        out[f"{key}_mb"] = round(max(0.0, maxrss_mb() - rss0), 1)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def round32(x: float) -> int:
    return max(32, int(round(x / 32.0)) * 32)


def other_sizes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Two sizes besides the default, H != W, multiples of 32 (never size 1): ~1.25H x 0.875W and
    ~0.75H x 1.125W."""
    b, c, h, w = shape[0], shape[1], shape[-2], shape[-1]
    sizes = [(round32(1.25 * h), round32(0.875 * w)), (round32(0.75 * h), round32(1.125 * w))]
    out = []
    for hh, ww in sizes:
        if hh == ww:
            ww += 32
        out.append((b, c, hh, ww))
    return out


def other_size_candidates(shape: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
    """Two other sizes (H != W), each with fallbacks: the first that runs counts. The first is the
    size `mixfx.rewrite` verifies at (the example shrunk by 32 x 64 pixels, 192x160 for 224x224),
    so the ground truth's forward there is also the verification's reference output; the second
    is ~0.75H x 1.125W. The fallbacks round the same target to multiples of 64 and 128: a network
    that needs H % 64 == 0 is still shape-polymorphic, and the ground truth must not call it
    fixed because 160 is not a multiple of 64."""
    from mixfx.rewrite import second_sizes

    b, c, h, w = shape[0], shape[1], shape[-2], shape[-1]
    first = second_sizes(torch.empty(shape, device="meta"))[0]
    out = []
    # last resorts: a whole multiple of the example on one axis keeps any divisibility it has
    # (maxvit_*_512: H % 512 == 0), a size within it on both axes meets any upper bound (mvitv2's
    # relative-position tables: H, W <= 224)
    for (fh, fw), cands, whole, small in (((first[-2] / h, first[-1] / w), [first], (2, 1), (0.75, 0.875)),
                                          ((0.75, 1.125), [], (1, 2), (0.625, 0.875))):
        for m in (32, 64, 128):
            hh, ww = max(m, m * round(fh * h / m)), max(m, m * round(fw * w / m))
            if hh == ww:
                ww += m
            if (hh, ww) != (h, w) and (b, c, hh, ww) not in cands:
                cands.append((b, c, hh, ww))
        for hh, ww in ((whole[0] * h, whole[1] * w), (round32(small[0] * h), round32(small[1] * w))):
            if hh != ww and (hh, ww) != (h, w) and (b, c, hh, ww) not in cands:
                cands.append((b, c, hh, ww))
        out.append(cands)
    return out


def quantile(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(round(q * 100)) - 1] if 0 < q < 1 else (
        xs[0] if q <= 0 else xs[-1])


# ----------------------------------------------------------------------------- timm registry
_SMALL_WORDS = [
    ("atto", 0), ("femto", 1), ("pico", 2), ("nano", 3), ("xxxs", 3), ("xxs", 4), ("tiny", 5), ("xs", 6),
    ("mini", 6), ("small", 7), ("_s_", 7), ("_t_", 6), ("lite", 6), ("light", 6), ("b0", 5),
]


def _size_hint(name: str) -> float:
    """A cheap score (lower = probably smaller) used to pick a few candidates per family before
    counting parameters on the meta device."""
    n = name.lower() + "_"
    score = 20.0
    for word, s in _SMALL_WORDS:
        if word in n:
            score = min(score, s)
    nums = [int(x) for x in re.findall(r"\d+", name)]
    # depth numbers (resnet18 < resnet50), widths (_050 < _100); input sizes >= 224 do not count
    small_nums = [x for x in nums if x < 200]
    score += 0.01 * (min(small_nums) if small_nums else 50)
    for big in ("large", "huge", "giant", "gigantic", "xlarge", "_l_", "_h_", "_g_", "base", "medium"):
        if big in n:
            score += 5
    sizes = [x for x in nums if x in (224, 256, 288, 320, 384, 448, 512, 518, 576, 640)]
    score += 0.001 * (max(sizes) if sizes else 224)
    return score


def families() -> dict[str, list[str]]:
    """timm module (family) -> its registered architectures."""
    import timm

    out = {}
    for mod in timm.list_modules():
        names = timm.list_models(module=mod)
        if names:
            out[mod] = list(names)
    return out


def family_of() -> dict[str, str]:
    return {name: fam for fam, names in families().items() for name in names}


def family_candidates(names: list[str], k: int = 3) -> list[str]:
    return sorted(names, key=lambda n: (_size_hint(n), n))[:k]


def build_timm(name: str, meta: bool, **kw: Any) -> torch.nn.Module:
    import timm

    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        m = timm.create_model(name, pretrained=False, **kw)
    return m.eval()


def timm_input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if len(size) != 3:
        size = (3, 224, 224)
    return (1, *size)
