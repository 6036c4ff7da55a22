"""Benchmark of the patchify <-> strided conv rewrites (issue 4): inference time of a patch
embedding as a strided conv and as reshape-into-patches + Linear, timed alternately in the same
run (CPU, float32), and the time each rewrite pass takes.

    python bench/patchify.py [--runs 7] [--batch 8] [--video-batch 2]

Cases: ViT-B/16's embedding (Conv2d 3->768, 16x16) at 224 and 384, and a video ViT's (Conv3d
3->768, 2x16x16) over 8x224x224. Forms: `conv` (the traced original), `patchify` (ConvToPatchify,
with the slice that keeps the input domain), `patchify-noslice` (exact_domain=False). `ratio` is
conv time / form time (> 1: faster than the conv). `rewrite_ms` is the pass that produced the form
(for `conv`: PatchifyToConv turning the patchify form back). Writes bench/results/patchify.json;
bench/rewrite.py includes these rows.
"""
from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.fx  # noqa: E402
from torch import nn  # noqa: E402

from passes._fxutil import annotate_example_inputs  # noqa: E402
from passes.conv_to_patchify import ConvToPatchify  # noqa: E402
from passes.patchify_to_conv import PatchifyToConv  # noqa: E402


class PatchEmbed(nn.Module):
    """timm-style: strided conv, then tokens [B, N, D]."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.proj = conv

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def cases(batch: int, video_batch: int) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    vit = PatchEmbed(nn.Conv2d(3, 768, 16, 16)).eval()
    video = PatchEmbed(nn.Conv3d(3, 768, (2, 16, 16), (2, 16, 16))).eval()
    return [
        ("ViT-B/16 @224", vit, (batch, 3, 224, 224)),
        ("ViT-B/16 @384", vit, (batch, 3, 384, 384)),
        ("video 2x16x16 @8x224x224", video, (video_batch, 3, 8, 224, 224)),
    ]


def _timed_pass(pass_, gm: torch.fx.GraphModule, x: torch.Tensor):
    gm = copy.deepcopy(gm)
    annotate_example_inputs(gm, x)
    t0 = time.perf_counter()
    res = pass_(gm)
    return res, (time.perf_counter() - t0) * 1e3


def _interleaved_medians(fns: dict[str, callable], runs: int) -> dict[str, float]:
    """Median ms of each fn, the forms alternating within each repetition (same thermal/cache state)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(runs):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def patchify_rows(runs: int = 7, batch: int = 8, video_batch: int = 2) -> list[dict]:
    rows = []
    for label, model, shape in cases(batch, video_batch):
        x = torch.randn(shape)
        conv_gm = torch.fx.symbolic_trace(model)
        patch, t_patch = _timed_pass(ConvToPatchify(), conv_gm, x)
        noslice, t_noslice = _timed_pass(ConvToPatchify(exact_domain=False), conv_gm, x)
        back, t_back = _timed_pass(PatchifyToConv(), patch.graph_module, x)
        assert patch.modified and noslice.modified and back.modified
        forms = {"conv": conv_gm, "patchify": patch.graph_module, "patchify-noslice": noslice.graph_module}
        rewrite_ms = {"conv": t_back, "patchify": t_patch, "patchify-noslice": t_noslice}
        with torch.no_grad():
            ref = model(x)
            err = {k: float((gm(x) - ref).abs().max()) for k, gm in forms.items()}
        med = _interleaved_medians({k: (lambda gm=gm: gm(x)) for k, gm in forms.items()}, runs)
        for form in forms:
            rows.append({
                "case": label, "form": form, "input": "x".join(map(str, shape)),
                "median_ms": round(med[form], 2), "ratio_vs_conv": round(med["conv"] / med[form], 3),
                "rewrite_ms": round(rewrite_ms[form], 2), "max_abs_err": float(f"{err[form]:.3g}"),
            })
    return rows


def main() -> None:
    import argparse

    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--video-batch", type=int, default=2)
    args = ap.parse_args()
    rows = patchify_rows(args.runs, args.batch, args.video_batch)
    table = Table(title=f"patch embedding: strided conv vs patchify + Linear (CPU, float32, median of {args.runs}, "
                        f"{torch.get_num_threads()} threads)")
    for col in ("case", "form", "input", "median ms", "ratio vs conv", "rewrite ms", "max abs err"):
        table.add_column(col, justify="left" if col in ("case", "form", "input") else "right")
    for r in rows:
        table.add_row(r["case"], r["form"], r["input"], f"{r['median_ms']:.1f}", f"{r['ratio_vs_conv']:.2f}",
                      f"{r['rewrite_ms']:.1f}", f"{r['max_abs_err']:.2g}")
    console = Console()
    console.print(table)
    out = HERE / "results" / "patchify.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "runs": args.runs, "batch": args.batch, "video_batch": args.video_batch}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
