"""Issue 14's tiling benchmark: a U-Net-style net on a large image, whole vs `mixfx.tile` vs
MONAI-style overlapping windows averaged (a few lines of slicing, no MONAI).

    python bench/tile.py [--size 4096] [--tile 512] [--channels 16] [--overlap 0.25] [--json tile.json]

Each variant runs in its own subprocess, so that its peak RSS (ru_maxrss) is its own and peaks
do not mix; every subprocess builds the same seeded model and input, and the whole-image output is
saved once so the others compare against it. Prints a table, writes bench/results/tile.json."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, maxrss_mb  # noqa: E402


def _load_unet():
    """The U-Net of examples/unet.py (one definition for the example, the tests and this bench)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "unet.py"
    spec = importlib.util.spec_from_file_location("_mixfx_example_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_unet = _load_unet()
UNet = _unet.UNet


def build(channels: int, up: str) -> nn.Module:
    torch.manual_seed(0)
    return _unet.randomise_norm_statistics(UNet(c=channels, up=up), 0.2)


def sliding_window_average(model: nn.Module, x: torch.Tensor, roi: int, overlap: float) -> torch.Tensor:
    """MONAI's sliding_window_inference with mode="constant": windows of roi x roi at a step of
    roi*(1-overlap), the last window flush with the border, outputs averaged where they overlap."""
    h, w = x.shape[-2:]
    step = max(1, int(roi * (1 - overlap)))

    def starts(n: int) -> list[int]:
        s = list(range(0, max(n - roi, 0) + 1, step))
        if s[-1] + roi < n:
            s.append(n - roi)
        return s

    out = count = None
    with torch.no_grad():
        for i in starts(h):
            for j in starts(w):
                y = model(x[..., i:i + roi, j:j + roi])
                if out is None:
                    out = y.new_zeros((*y.shape[:2], h, w))
                    count = y.new_zeros((1, 1, h, w))
                out[..., i:i + roi, j:j + roi] += y
                count[..., i:i + roi, j:j + roi] += 1
    return out / count


def child(args: argparse.Namespace) -> None:
    """One variant in this process: prints one JSON line."""
    import mixfx

    model = build(args.channels, args.up)
    torch.manual_seed(1)
    x = torch.randn(1, 3, args.size, args.size)
    rss0 = maxrss_mb()
    t0 = time.perf_counter()
    if args.variant == "whole":
        with torch.no_grad():
            y = model(x)
    elif args.variant == "tiled":
        y = mixfx.tile(model, x, (args.tile, args.tile))
    else:
        y = sliding_window_average(model, x, args.tile, args.overlap)
    seconds = time.perf_counter() - t0
    peak = maxrss_mb()
    result = {"variant": args.variant, "seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1),
              "rss_before_mb": round(rss0, 1)}
    ref_path = Path(args.ref)
    if args.variant == "whole":
        torch.save(y, ref_path)
    else:
        ref = torch.load(ref_path)
        err = (y - ref).abs().max().item()
        result.update(max_abs_err=err, rel_err=err / ref.abs().max().item())
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--up", default="bilinear", choices=["nearest", "bilinear", "tconv"])
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--variant", choices=["whole", "tiled", "monai"])
    ap.add_argument("--ref")
    ap.add_argument("--json", default="tile.json", help="file name under bench/results/")
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    import mixfx

    model = build(args.channels, args.up)
    report = mixfx.analyze(model, torch.empty(1, 3, 256, 256))
    rf = report.receptive_field
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = str(Path(tmp) / "whole.pt")
        for variant in ("whole", "tiled", "monai"):
            cmd = [sys.executable, __file__, "--variant", variant, "--ref", ref, "--size", str(args.size),
                   "--tile", str(args.tile), "--channels", str(args.channels), "--up", args.up,
                   "--overlap", str(args.overlap)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                rows.append({"variant": variant, "error": (proc.stderr or proc.stdout)[-800:]})
                print(f"{variant}: failed\n{proc.stderr[-800:]}")
                continue
            rows.append(json.loads(line[7:]))
    whole = next((r for r in rows if r["variant"] == "whole" and "peak_rss_mb" in r), None)
    print(f"U-Net c={args.channels} up={args.up}, input {args.size}x{args.size}, tile {args.tile}, receptive field "
          f"{rf.size} px (halo ~{max(rf.size) // 2} px), tileable={report.tileable}")
    print(f"{'variant':<8} {'time s':>8} {'peak RSS MB':>12} {'vs whole':>9} {'max abs err':>12} {'rel err':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<8} failed")
            continue
        ratio = f"{whole['peak_rss_mb'] / r['peak_rss_mb']:.1f}x" if whole else "-"
        print(f"{r['variant']:<8} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} {ratio:>9} "
              f"{r.get('max_abs_err', 0):>12.2e} {r.get('rel_err', 0):>10.2e}")
    out = {"size": args.size, "tile": args.tile, "channels": args.channels, "up": args.up,
           "overlap": args.overlap, "receptive_field": rf.size, "tileable": report.tileable,
           "torch": torch.__version__, "threads": 1, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
