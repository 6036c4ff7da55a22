"""Analyse a ~1B-parameter model built on the meta device: wall time and peak RSS, each model in a
fresh subprocess (so the peak RSS is that model's alone). Writes bench/results/meta_large.json.

    .venv/bin/python bench/meta_large.py [timm:NAME ...]
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from mixfx.loading import load_model
from mixfx.analysis import analyze
t_import = time.perf_counter() - t0
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
loaded = load_model(sys.argv[1], meta=True)
t_build = time.perf_counter() - t1
params = sum(p.numel() for p in loaded.module.parameters())
t2 = time.perf_counter()
rep = analyze(loaded.module, loaded.example_input, name=loaded.name)
t_an = time.perf_counter() - t2
print(json.dumps({"spec": sys.argv[1], "params": params, "input": list(loaded.example_input.shape),
                  "classification": rep.classification, "build_s": t_build, "analyze_s": t_an,
                  "import_s": t_import, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_import_mb": rss0 / 1024,
                  "fp32_weights_would_be_mb": params * 4 / 2**20}))
"""


def main(specs: list[str]) -> None:
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            rows.append({"spec": spec, "error": proc.stderr.strip().splitlines()[-1:], "wall_s": wall})
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s_subprocess"] = wall
            rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    out = Path(__file__).resolve().parent / "results" / "meta_large.json"
    import platform

    import torch
    out.write_text(json.dumps({"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["timm:vit_giant_patch14_224", "timm:resnet50"])
