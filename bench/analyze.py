"""Issue 2's benchmark: mixfx.analyze time and peak memory against torch.export (dynamic H, W) and
the naive check (real forwards at three sizes), plus time per node against depth.

    python bench/analyze.py [--models resnet50,convnext_tiny,...] [--runs 3] [--skip-naive]
    python bench/analyze.py --against DIR --models a,b,c [--runs 3]   # old code in DIR vs this one

Each model is measured in a fresh subprocess (so ru_maxrss is its own): meta build, one warm-up
analysis, then the median of --runs analyses; export and naive baselines in the same process.
Writes bench/results/analyze.json and prints a table."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, build_timm, maxrss_mb, n_params, other_sizes, timm_input_shape  # noqa: E402

MODELS = ["resnet50", "convnext_tiny", "vit_base_patch16_224", "mixer_b16_224", "vit_large_patch16_224"]


def measure(name: str, runs: int, naive: bool) -> dict:
    import torch

    import mixfx

    out: dict = {"model": name}
    rss0 = maxrss_mb()
    t0 = time.perf_counter()
    m = build_timm(name, meta=True)
    out["build_meta_s"] = time.perf_counter() - t0
    out["params_m"] = n_params(m) / 1e6
    shape = timm_input_shape(m)
    x = torch.empty(shape, device="meta")
    t0 = time.perf_counter()
    rep = mixfx.analyze(m, x)
    out["analysis_cold_s"] = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        rep = mixfx.analyze(m, x)
        times.append(time.perf_counter() - t0)
    out["analysis_s"] = statistics.median(times)
    out["analysis_mb"] = maxrss_mb() - rss0
    out["classification"] = rep.classification
    out["nodes"] = len(rep.nodes) if getattr(rep, "nodes", None) else None
    # torch.export with dynamic H, W (on the meta model)
    from torch.export import Dim

    t0 = time.perf_counter()
    try:
        torch.export.export(m, (x,), dynamic_shapes=({2: Dim.DYNAMIC, 3: Dim.DYNAMIC},), strict=False)
        out["export"] = "ok"
    except Exception as exc:  # noqa: BLE001
        out["export"] = f"failed: {type(exc).__name__}"
    out["export_s"] = time.perf_counter() - t0
    if naive:
        rss1 = maxrss_mb()
        t0 = time.perf_counter()
        real = build_timm(name, meta=False)
        res = []
        for s in [shape] + other_sizes(shape):
            try:
                with torch.no_grad():
                    real(torch.randn(s))
                res.append("ok")
            except Exception:  # noqa: BLE001
                res.append("fail")
        out["naive_s"] = time.perf_counter() - t0
        out["naive_mb"] = maxrss_mb() - rss1
        out["naive_runs"] = res
        out["speedup_vs_naive"] = out["naive_s"] / (out["build_meta_s"] + out["analysis_s"])
    return out


def cpu_one(name: str, runs: int) -> dict:
    """CPU seconds of the model's first analysis in a process (after a warm-up on a tiny model,
    as the CLI and the zoo run it) and the median of `runs` more, and what it concluded: CPU, not
    wall, so that a busy machine does not blur an old-vs-new comparison."""
    import torch
    from torch import nn

    import mixfx

    with torch.device("meta"):
        tiny = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    mixfx.analyze(tiny, torch.empty(1, 3, 64, 64, device="meta"))
    m = build_timm(name, meta=True)
    x = torch.empty(timm_input_shape(m), device="meta")
    times, rep = [], None
    for _ in range(1 + runs):
        t0 = time.process_time()
        rep = mixfx.analyze(m, x, name=name)
        times.append(time.process_time() - t0)
    return {"model": name, "cpu_s": times[0], "cpu_warm_s": statistics.median(times[1:]),
            "classification": rep.classification,
            "rigid": [f"{r.module or r.node}|{r.kind}" for r in rep.rigid_nodes],
            "head": rep.head.module or rep.head.node if rep.head else None,
            "global_mixing": [g.module or g.node for g in rep.global_mixing],
            "global_context": [g.module or g.node for g in rep.global_context],
            "stopped": any("[timeout]" in n for n in rep.notes)}


def against(models: list[str], other: str, runs: int) -> int:
    """Each model analysed by the code in `other` (a checkout of an older commit) and by this one,
    alternately, each in its own subprocess; a table of CPU medians and verdict differences."""
    import os

    here = str(Path(__file__).resolve().parent.parent)
    rows = []
    print(f"{'CPU s (first, repeated)':28s} {'old':>15s}       {'new':>15s}")
    for name in models:
        row: dict = {"model": name}
        for label, root in (("old", other), ("new", here)):
            env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
            p = subprocess.run([sys.executable, str(Path(root) / "bench" / "analyze.py"), "--cpu-one", name,
                                "--runs", str(runs)], capture_output=True, text=True, env=env)
            try:
                row[label] = json.loads(p.stdout.strip().splitlines()[-1])
            except Exception:  # noqa: BLE001
                row[label] = {"error": p.stderr[-300:]}
        old, new = row["old"], row["new"]
        keys = ("classification", "rigid", "head", "global_mixing", "global_context")
        row["same"] = [k for k in keys if old.get(k) != new.get(k)] or "all"
        rows.append(row)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "analyze_against.json").write_text(json.dumps(rows, indent=2))  # as rows finish
        print(f"{name[:28]:28s} old {old.get('cpu_s', float('nan')):5.2f} {old.get('cpu_warm_s', float('nan')):5.2f}"
              f"{' stop' if old.get('stopped') else '     '}  new {new.get('cpu_s', float('nan')):5.2f} "
              f"{new.get('cpu_warm_s', float('nan')):5.2f}{' stop' if new.get('stopped') else '     '}  "
              f"{'' if row['same'] == 'all' else 'differ: ' + ','.join(row['same'])}", flush=True)
    ok = [r for r in rows if "cpu_s" in r["old"] and "cpu_s" in r["new"]]
    if ok:
        mo = statistics.median(r["old"]["cpu_s"] for r in ok)
        mn = statistics.median(r["new"]["cpu_s"] for r in ok)
        wo = statistics.median(r["old"]["cpu_warm_s"] for r in ok)
        wn = statistics.median(r["new"]["cpu_warm_s"] for r in ok)
        print(f"median CPU per analysis, first in its process: old {mo:.3f} s, new {mn:.3f} s (x{mo / mn:.2f}); "
              f"repeated: old {wo:.3f} s, new {wn:.3f} s (x{wo / wn:.2f}); "
              f"stopped by the budget: old {sum(r['old'].get('stopped', False) for r in ok)}, "
              f"new {sum(r['new'].get('stopped', False) for r in ok)} of {len(ok)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "analyze_against.json").write_text(json.dumps(rows, indent=2))
    return 0


def depth_scaling(runs: int) -> dict:
    import torch
    from torch import nn

    import mixfx

    res = {}
    for depth in (12, 192):
        with torch.device("meta"):
            layers = [nn.Conv2d(3, 16, 3, padding=1)]
            for _ in range(depth):
                layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
            m = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
        x = torch.empty(1, 3, 64, 64, device="meta")
        mixfx.analyze(m, x)
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            mixfx.analyze(m, x)
            ts.append(time.perf_counter() - t0)
        nodes = len(mixfx.trace(m, x).graph_module.graph.nodes)
        res[depth] = {"nodes": nodes, "analysis_s": statistics.median(ts), "per_node_ms": 1e3 * statistics.median(ts) / nodes}
    res["ratio_192_vs_12"] = res[192]["per_node_ms"] / res[12]["per_node_ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--depth", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--against", help="a checkout of older code: compare CPU time and verdicts with it")
    ap.add_argument("--cpu-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu_one:
        print(json.dumps(cpu_one(args.cpu_one, args.runs)))
        return 0
    if args.against:
        return against(args.models.split(","), args.against, args.runs)
    if args.one:
        print(json.dumps(measure(args.one, args.runs, not args.skip_naive)))
        return 0
    if args.depth:
        print(json.dumps(depth_scaling(args.runs)))
        return 0
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--runs", str(args.runs)] + (["--skip-naive"] if args.skip_naive else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        try:
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        except Exception:  # noqa: BLE001
            rows.append({"model": name, "error": p.stderr[-300:]})
        print(rows[-1], flush=True)
    p = subprocess.run([sys.executable, __file__, "--depth", "--runs", str(args.runs)], capture_output=True, text=True)
    depth = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-300:]}
    from rich.console import Console
    from rich.table import Table

    t = Table(title="mixfx.analyze vs baselines (CPU, warm, median)")
    for c in ("model", "params M", "class", "build meta s", "analyse s", "analyse MB", "export s", "export", "naive s", "naive MB", "speed-up"):
        t.add_column(c)
    f = lambda v, d=2: "" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        t.add_row(r["model"], f(r.get("params_m"), 1), f(r.get("classification")), f(r.get("build_meta_s")),
                  f(r.get("analysis_s")), f(r.get("analysis_mb"), 0), f(r.get("export_s")), f(r.get("export")),
                  f(r.get("naive_s")), f(r.get("naive_mb"), 0), f(r.get("speedup_vs_naive"), 1))
    Console().print(t)
    print("depth scaling:", depth)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "analyze.json").write_text(json.dumps({"models": rows, "depth": depth}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
