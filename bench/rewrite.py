"""Benchmark of `mixfx rewrite`: rewrite + verification time, and inference speed of the rewritten
model beside the original, measured in the same run (CPU, float32, batch 8, median of several runs).

    python bench/rewrite.py [--runs 5] [--batch 8] [--quick]

Models (timm, random weights): ConvNeXt-T -> conv (also with both models in channels_last),
Mixer-B/16 -> conv, ResNet-50 -> linear (its 1x1 convs). Targets: rewrite + verification under
5 s each; rewritten ConvNeXt-T at least 0.95x the original's throughput.
Writes bench/results/rewrite.json; includes the rows of bench/patchify.py when it exists.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from mixfx.rewrite import count_permutes, rewrite  # noqa: E402
from mixfx.tracing import fx_trace  # noqa: E402

CASES = [  # (label, timm name, kwargs, target)
    ("ConvNeXt-T", "convnext_tiny", {}, "conv"),
    ("Mixer-B/16", "mixer_b16_224", {}, "conv"),
    ("ResNet-50", "resnet50", {}, "linear"),
]
QUICK = [("ConvNeXt-atto", "convnext_atto", {}, "conv"), ("Mixer-S/16", "mixer_s16_224", {}, "conv"),
         ("ResNet-18", "resnet18", {}, "linear")]


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def throughput_ratio(original, rewritten, x, runs: int, channels_last: bool = False) -> dict:
    """Original and rewritten timed alternately in the same run; ratio = original time / rewritten time
    (>1: the rewritten model is faster)."""
    if channels_last:
        original = original.to(memory_format=torch.channels_last)
        rewritten = rewritten.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t_orig = median_time(lambda: original(x), runs)
        t_new = median_time(lambda: rewritten(x), runs)
        t_orig = min(t_orig, median_time(lambda: original(x), runs))  # interleave to share the noise
        t_new = min(t_new, median_time(lambda: rewritten(x), runs))
    return {"original_s": round(t_orig, 4), "rewritten_s": round(t_new, 4), "ratio": round(t_orig / t_new, 3)}


def bench_case(label: str, name: str, kwargs: dict, target: str, runs: int, batch: int) -> list[dict]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm zero-initialises some heads (Mixer): give the check something to compare
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    x1 = torch.randn(1, 3, 224, 224)
    t0 = time.perf_counter()
    res = rewrite(model, target, x1, analyze=False)
    rewrite_s = time.perf_counter() - t0
    row = {
        "model": label, "timm": name, "to": target, "rewrite_verify_s": round(rewrite_s, 3),
        "passes_s": round(res.timings.get("passes_s", 0), 3), "verify_s": round(res.timings.get("verify_s", 0), 3),
        "changes": len(res.changes), "skipped": len(res.skipped),
        "permutes_before": count_permutes(fx_trace(model), x1),
        "permutes_after": count_permutes(res.module, x1),
        "max_abs_err": res.verification.max_abs_err, "max_rel_err": res.verification.max_rel_err,
        "verified_sizes": ["x".join(map(str, s.input_shape)) for s in res.verification.sizes],
        "memory_format": "contiguous",
    }
    xb = torch.randn(batch, 3, 224, 224)
    row.update(throughput_ratio(model, res.module, xb, runs))
    rows = [row]
    if name.startswith("convnext"):
        cl = dict(row, memory_format="channels_last")
        cl.update(throughput_ratio(model, res.module, xb, runs, channels_last=True))
        rows.append(cl)
    return rows


def patchify_rows() -> list[dict]:
    if not (HERE / "patchify.py").exists():
        return []
    try:
        import patchify  # type: ignore[import-not-found]

        return list(patchify.patchify_rows())
    except Exception as exc:  # noqa: BLE001 - another bench's failure must not lose these figures
        return [{"model": "bench/patchify.py", "error": f"{type(exc).__name__}: {exc}"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="small models (a smoke run)")
    ap.add_argument("--no-patchify", action="store_true")
    args = ap.parse_args()
    console = Console()
    rows: list[dict] = []
    for case in (QUICK if args.quick else CASES):
        console.print(f"[dim]benchmarking {case[0]} --to {case[3]} ...[/]")
        rows += bench_case(*case, runs=args.runs, batch=args.batch)
    extra = [] if args.no_patchify else patchify_rows()

    table = Table(title=f"mixfx rewrite (CPU, float32, batch {args.batch}, median of {args.runs}, "
                        f"{torch.get_num_threads()} threads)")
    for col in ("model", "to", "layout", "rewrite+verify s", "changes", "skipped", "permutes",
                "max abs err", "orig ms", "rewritten ms", "speed ratio"):
        table.add_column(col, justify="right" if col not in ("model", "to", "layout") else "left")
    for r in rows:
        table.add_row(r["model"], r["to"], r["memory_format"], f"{r['rewrite_verify_s']:.2f}", str(r["changes"]),
                      str(r["skipped"]), f"{r['permutes_before']} -> {r['permutes_after']}", f"{r['max_abs_err']:.2g}",
                      f"{r['original_s'] * 1e3:.0f}", f"{r['rewritten_s'] * 1e3:.0f}", f"{r['ratio']:.3f}")
    console.print(table)
    if extra:
        t2 = Table(title="patchify rewrites (bench/patchify.py)")
        keys = sorted({k for r in extra for k in r})
        for k in keys:
            t2.add_column(k)
        for r in extra:
            t2.add_row(*[str(r.get(k, "")) for k in keys])
        console.print(t2)
    out = HERE / "results" / "rewrite.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "batch": args.batch, "runs": args.runs}
    out.write_text(json.dumps({"meta": meta, "rows": rows, "patchify_rows": extra}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
