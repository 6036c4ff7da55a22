"""Cost of the index-bound checks (issue 13): every eager meta forward now computes constant-valued
tensors for real and checks the indexing ops that read at them; the analyser searches a bound
only where such a read grows with the input size.

    python bench/index_bounds.py [--models resnet50,...] [--runs 5] [--forward-only mvitv2_tiny,...]

Per model, in one process, alternating with and without the checks (the baseline: the mode
replaced by a no-op and the bound stage off): the median of --runs eager meta forwards at the
example size and of --runs `mixfx.analyze` calls (after one warm-up each). Prints a table and
writes bench/results/index_bounds.json."""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, build_timm, timm_input_shape  # noqa: E402

MODELS = ["resnet50", "convnext_tiny", "vit_small_patch16_224", "efficientnet_b0"]
FORWARD_ONLY = ["swin_tiny_patch4_window7_224", "mvitv2_tiny"]


class _NoChecks(contextlib.AbstractContextManager):
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __exit__(self, *exc) -> None:
        return None


@contextlib.contextmanager
def checks(on: bool):
    from mixfx.analysis import core, index_bounds

    if on:
        yield
        return
    mode, stage = index_bounds.IndexValues, core._Analyser._index_bounds
    index_bounds.IndexValues = _NoChecks
    core._Analyser._index_bounds = lambda self, reads, search: []
    try:
        yield
    finally:
        index_bounds.IndexValues, core._Analyser._index_bounds = mode, stage


def _median_ab(fn, runs: int) -> tuple[float, float]:
    """Median seconds of `fn` with the checks on and off, runs interleaved."""
    on, off = [], []
    for flag in (True, False):  # warm-up
        with checks(flag):
            fn()
    for _ in range(runs):
        for flag, out in ((True, on), (False, off)):
            with checks(flag):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return statistics.median(on), statistics.median(off)


def measure(name: str, runs: int, analyse: bool) -> dict:
    import torch

    import mixfx
    from mixfx.shapes import eager_meta_forward

    m = build_timm(name, meta=True)
    shape = timm_input_shape(m)
    row: dict = {"model": name, "input": list(shape)}
    row["forward_on_s"], row["forward_off_s"] = _median_ab(lambda: eager_meta_forward(m, shape), runs)
    if analyse:
        x = torch.empty(shape, device="meta")
        row["analyse_on_s"], row["analyse_off_s"] = _median_ab(lambda: mixfx.analyze(m, x), runs)
        row["constraints"] = mixfx.analyze(m, x).constraints
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--forward-only", default=",".join(FORWARD_ONLY))
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    rows = [measure(n, args.runs, True) for n in args.models.split(",") if n]
    rows += [measure(n, args.runs, False) for n in args.forward_only.split(",") if n]
    print(f"{'model':<30} {'meta fwd on':>11} {'off':>8} {'ratio':>6} {'analyse on':>10} {'off':>7} {'ratio':>6}")
    for r in rows:
        a = (f"{r['analyse_on_s']:>10.3f} {r['analyse_off_s']:>7.3f} {r['analyse_on_s'] / r['analyse_off_s']:>6.2f}"
             if "analyse_on_s" in r else "")
        print(f"{r['model']:<30} {r['forward_on_s']:>11.4f} {r['forward_off_s']:>8.4f} "
              f"{r['forward_on_s'] / r['forward_off_s']:>6.2f} {a}")
    with_analysis = [r for r in rows if "analyse_on_s" in r]
    if with_analysis:
        on = statistics.median(r["analyse_on_s"] for r in with_analysis)
        off = statistics.median(r["analyse_off_s"] for r in with_analysis)
        print(f"median analysis over {len(with_analysis)} models: {on:.3f} s with the checks, {off:.3f} s without "
              f"({on / off:.2f}x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "index_bounds.json").write_text(json.dumps({"runs": args.runs, "models": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
