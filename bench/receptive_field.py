"""Issue 14's validation: the computed receptive field (mixfx.analyze) against an empirical one,
and the analysis time it adds.

    python bench/receptive_field.py [--models tv:resnet50,timm:resnet18,...] [--timing-only] [--no-timing]

Empirical field: the support of the input gradient of one output position of the pre-head map
(summed over channels), per axis, on an input long along that axis (the computed size plus
margins) and 64 px wide along the other. Independent of the walk: the model runs eagerly in
float64 with every weight made positive and averaging (|w| / sum |w| per output unit), biases tiny
and positive, BatchNorm statistics neutral, a small positive input: no path cancels and no ReLU
closes. A max pool routes gradient to one element per window, so max pools run as average pools of
the same geometry (a TorchFunctionMode). Size = last - first + 1 pixel of the support; stride = the
shift of the support between two neighbouring output positions; a support that reaches both ends
of the input is "unbounded". Only the choice of the pre-head node and the output position come
from mixfx.

Timing: each timm model in a fresh subprocess, `mixfx.analyze` with and without the receptive
field hook (`mixfx.receptive_field.attach_receptive_fields` replaced by a no-op), alternating,
median of --runs each after one warm-up of each; the walk's cache of leaf-module results is
cleared before each run, as in a fresh process.

Writes bench/results/receptive_field.json and prints tables."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS  # noqa: E402

MODELS = ["tv:resnet50", "timm:resnet50", "timm:resnet18", "tv:vgg11", "tv:densenet121", "tv:mobilenet_v2",
          "timm:mobilenetv2_100", "timm:efficientnet_b0", "timm:regnetx_002", "timm:regnety_002",
          "timm:convnext_atto", "timm:resnet18d", "tv:shufflenet_v2_x0_5", "tv:squeezenet1_0", "tv:googlenet",
          "timm:dla34", "timm:mobilenetv3_small_100", "unet:nearest", "unet:bilinear", "unet:tconv"]
TIMING_MODELS = ["resnet18", "resnet50", "efficientnet_b0", "convnext_atto", "regnetx_002", "mobilenetv3_small_100",
                 "densenet121", "vgg11"]


def build(spec: str, meta: bool = False) -> nn.Module:
    src, name = spec.split(":")
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        if src == "tv":
            import torchvision
            model = getattr(torchvision.models, name)(weights=None)
        elif src == "timm":
            import timm
            model = timm.create_model(name, pretrained=False)
        else:
            from tile import UNet
            torch.manual_seed(0)
            model = UNet(c=4, depth=3, up=name)
    return model.eval()


# ----------------------------------------------------------------------------- empirical field
class _PoolsAsAverages(torch.overrides.TorchFunctionMode):
    """max_pool -> avg_pool of the same geometry (dilated ones: a depthwise conv of ones)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if "max_pool2d" not in name:
            return func(*args, **kwargs)
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        a = dict(zip(names, args), **kwargs)
        x, k = a["input"], a["kernel_size"]
        k = (k, k) if isinstance(k, int) else tuple(k)
        stride = a.get("stride") or k
        dil = a.get("dilation", 1)
        if dil not in (1, (1, 1), [1, 1]):
            ones = torch.ones(x.shape[1], 1, *k, dtype=x.dtype)
            y = F.conv2d(x, ones, stride=stride, padding=a.get("padding", 0), dilation=dil, groups=x.shape[1])
        else:
            y = F.avg_pool2d(x, k, stride, a.get("padding", 0), ceil_mode=bool(a.get("ceil_mode", False)))
        return (y, None) if a.get("return_indices") else y


def positive_copy(model: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.zero_()
                mod.running_var.fill_(1.0)
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                a = p.abs() + 1e-6
                p.copy_(a / a.flatten(1).sum(1).view(-1, *([1] * (p.dim() - 1))))
            elif name.endswith("bias"):
                p.fill_(1e-4)
            else:
                p.copy_(p.abs() + 1e-3)
    return m


def empirical(model: nn.Module, target_fn, shape: tuple[int, ...], axis: int, positions: list[int]) -> list:
    """Support (first, last) along `axis` of the gradient of each output position (centre of the
    other axis)."""
    x = (torch.rand(shape, dtype=torch.float64) * 0.5 + 0.5) * 1e-3
    x.requires_grad_(True)
    with _PoolsAsAverages():
        y = target_fn(x)
    other = y.shape[3 - axis] // 2
    spans = []
    for i in positions:
        idx = (0, slice(None), i, other) if axis == 0 else (0, slice(None), other, i)
        x.grad = None
        y[idx].sum().backward(retain_graph=True)
        g = x.grad.abs().sum(dim=(0, 1)).sum(dim=1 - axis)
        nz = torch.nonzero(g > 0).flatten()
        spans.append((int(nz.min()), int(nz.max())) if len(nz) else None)
    return spans


def validate(spec: str) -> dict:
    import mixfx
    from mixfx.receptive_field import compute_fields, exact_interval
    from mixfx.tiling import _runner

    row: dict = {"model": spec}
    t0 = time.perf_counter()
    meta = build(spec, meta=True)
    report = mixfx.analyze(meta, input_shape=(1, 3, 224, 224))
    row["analyze_s"] = round(time.perf_counter() - t0, 2)
    rf = report.receptive_field
    row["computed"] = None if rf is None else {"size": rf.size, "stride": rf.stride, "bounded": rf.bounded,
                                               "unbounded_at": rf.unbounded_at, "reason": rf.reason}
    row["tileable"] = report.tileable
    model = build(spec)
    pos_model = positive_copy(model)
    gm = mixfx.trace(pos_model, torch.zeros(1, 3, 224, 224, dtype=torch.float64)).graph_module
    emp = {}
    for axis in (0, 1):
        if rf is not None and rf.bounded:
            long = 32 * math.ceil((rf.size[axis] + 8 * max(1, int(rf.stride[axis])) + 64) / 32)
        else:
            long = 512
        shape = (1, 3, long, 64) if axis == 0 else (1, 3, 64, long)
        run = compute_fields(gm, shape)
        target = run.pre_head()
        fn = _runner(pos_model, gm, run, target)
        d, m = run.fields[target].axes()[axis]
        n_out = run.shapes[target][d]
        centre = n_out // 2
        # the stride from the shift of the support's first pixel over k positions (k = 8 covers the
        # phases of up to three 2x upsamplings; the first pixel stays clear of the far border)
        k = max(1, min(8, n_out - 1 - centre))
        spans = empirical(pos_model, fn, shape, axis, [centre, centre + k])
        first = spans[0]
        e = {"input": list(shape[2:]), "position": centre, "support": first}
        if first is not None:
            e["size"] = first[1] - first[0] + 1
            e["unbounded"] = first[0] == 0 and first[1] == long - 1
            if spans[1] is not None:
                shift = (spans[1][0] - first[0]) / k
                e["stride"] = int(shift) if shift == int(shift) else shift
            if rf is not None and rf.bounded:
                a, b = exact_interval(m, centre)
                e["computed_interval"] = [max(a, 0), min(b, long - 1)]
        emp[axis] = e
    row["empirical"] = emp
    row["agree"], row["disagreements"] = _compare(rf, emp)
    return row


def _compare(rf, emp) -> tuple[bool, list[str]]:
    problems = []
    for axis, e in emp.items():
        if e.get("support") is None:
            problems.append(f"axis {axis}: empty gradient support")
            continue
        if rf is None:
            problems.append("no computed field")
            continue
        if not rf.bounded:
            if not e["unbounded"]:
                problems.append(f"axis {axis}: computed unbounded, empirical support {e['size']} px of {e['input']}")
            continue
        if e["unbounded"]:
            problems.append(f"axis {axis}: computed {rf.size[axis]} px, empirical support spans the whole input")
            continue
        if e["size"] != rf.size[axis]:
            problems.append(f"axis {axis}: size computed {rf.size[axis]}, empirical {e['size']}")
        if e.get("stride") != rf.stride[axis]:
            problems.append(f"axis {axis}: stride computed {rf.stride[axis]}, empirical {e.get('stride')}")
        if e.get("computed_interval") and list(e["support"]) != e["computed_interval"]:
            problems.append(f"axis {axis}: support {e['support']} vs computed {e['computed_interval']}")
    return not problems, problems


# ----------------------------------------------------------------------------- timing
def timing_child(name: str, runs: int) -> dict:
    import timm  # noqa: F401 - imported before mixfx decides on timm's FX lists

    import mixfx
    import mixfx.receptive_field as rfmod

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
    shape = (1, 3, 224, 224)
    original = rfmod.attach_receptive_fields
    on, off, hook = [], [], []

    def timed(enabled: bool) -> float:
        rfmod.attach_receptive_fields = original if enabled else (lambda report, gm: None)
        rfmod._INNER_RESULTS.clear()  # as in a fresh process: no leaf module walked before
        t0 = time.perf_counter()
        report = mixfx.analyze(model, input_shape=shape)
        dt = time.perf_counter() - t0
        if enabled:
            hook.append(report.timings.get("receptive_field_s", 0.0))
        return dt

    timed(False)
    timed(True)
    hook.clear()
    for _ in range(runs):
        off.append(timed(False))
        on.append(timed(True))
    rfmod.attach_receptive_fields = original
    return {"model": name, "without_s": statistics.median(off), "with_s": statistics.median(on),
            "hook_s": statistics.median(hook)}


def timing(models: list[str], runs: int) -> list[dict]:
    rows = []
    for name in models:
        cmd = [sys.executable, __file__, "--timing-child", name, "--runs", str(runs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        rows.append(json.loads(line[7:]) if line else {"model": name, "error": proc.stderr[-500:]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--timing-models", default=",".join(TIMING_MODELS))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true")
    ap.add_argument("--timing-child")
    args = ap.parse_args()
    if args.timing_child:
        print("RESULT " + json.dumps(timing_child(args.timing_child, args.runs)), flush=True)
        return
    torch.set_num_threads(1)
    out_path = RESULTS / "receptive_field.json"
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    out["torch"] = torch.__version__
    if not args.timing_only:
        rows = []
        print(f"{'model':<22} {'computed':>18} {'empirical':>18} {'tileable':>8}  agree")
        for spec in args.models.split(","):
            try:
                row = validate(spec)
            except Exception as exc:  # noqa: BLE001 - a bench row, not a crash
                row = {"model": spec, "error": f"{type(exc).__name__}: {exc}"[:300], "agree": False}
            rows.append(row)
            c = row.get("computed")
            ctext = "-" if not c else (f"{c['size'][0]}x{c['size'][1]}/{c['stride'][0]}" if c["bounded"]
                                       else "unbounded")
            e = row.get("empirical", {})
            etext = "-" if not e else ("unbounded" if all(v.get("unbounded") for v in e.values()) else
                                       f"{e[0].get('size')}x{e[1].get('size')}/{e[0].get('stride')}")
            print(f"{spec:<22} {ctext:>18} {etext:>18} {str(row.get('tileable', '-')):>8}  "
                  f"{'yes' if row['agree'] else 'NO: ' + '; '.join(row.get('disagreements', [row.get('error', '')]))}")
            if c and not c["bounded"]:
                print(f"{'':<22}   unbounded at {c['unbounded_at']}: {c['reason']}")
        out["validation"] = rows
        ok = sum(1 for r in rows if r["agree"])
        print(f"agree on size and stride: {ok}/{len(rows)}")
    if not args.no_timing:
        rows = timing(args.timing_models.split(","), args.runs)
        print(f"\n{'model':<24} {'analyze s (before)':>18} {'with field s':>13} {'added':>7} {'hook s':>7}")
        ratios = []
        for r in rows:
            if "error" in r:
                print(f"{r['model']:<24} failed: {r['error'][-200:]}")
                continue
            ratio = r["with_s"] / r["without_s"] - 1
            ratios.append(ratio)
            print(f"{r['model']:<24} {r['without_s']:>18.3f} {r['with_s']:>13.3f} {ratio:>6.0%} {r['hook_s']:>7.3f}")
        good = [r for r in rows if "error" not in r]
        if good:
            before = statistics.median(r["without_s"] for r in good)
            after = statistics.median(r["with_s"] for r in good)
            print(f"median analysis {before:.3f} s -> {after:.3f} s ({after / before - 1:+.0%}); median per-model "
                  f"added {statistics.median(ratios):+.0%}")
            out["timing"] = {"rows": rows, "median_before_s": before, "median_after_s": after,
                             "median_added": after / before - 1, "median_per_model_added": statistics.median(ratios)}
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
