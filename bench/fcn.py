"""`--to fcn` over a sample of small classifiers (timm + torchvision, random weights).

For each model: analyse, convolutionalise, verify (1x1 map equal to the original at the example
size; at two larger sizes every checked map position equal to the original head on its window of
the feature map). Prints one row per model and the fraction converted and verified among those
the analyser calls convolutional; writes bench/results/fcn.json.

    PYTHONPATH=$PWD python bench/fcn.py            # the default sample
    PYTHONPATH=$PWD python bench/fcn.py --models timm:resnet18 torchvision:vgg11
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import RESULTS, n_params  # noqa: E402

import mixfx  # noqa: E402
from mixfx.errors import MixfxError  # noqa: E402

# small convolutional classifiers of different head styles (and two that must be refused)
SAMPLE = [
    "torchvision:resnet18", "torchvision:alexnet", "torchvision:vgg11", "torchvision:squeezenet1_1",
    "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small", "torchvision:shufflenet_v2_x0_5",
    "torchvision:mnasnet0_5", "torchvision:efficientnet_b0", "torchvision:regnet_x_400mf",
    "torchvision:densenet121", "torchvision:convnext_tiny", "torchvision:googlenet",
    "timm:resnet10t", "timm:mobilenetv3_small_050", "timm:efficientnet_b0", "timm:convnext_atto",
    "timm:regnetx_002", "timm:ghostnet_050", "timm:lcnet_050", "timm:mixnet_s", "timm:rexnet_100",
    "timm:repvgg_a0", "timm:tinynet_e", "timm:cspresnet50", "timm:dla34", "timm:vgg11", "timm:resnest14d",
    "timm:poolformer_s12", "timm:hrnet_w18_small", "timm:selecsls42b", "timm:inception_v3",
    "timm:vit_tiny_patch16_224", "timm:mixer_s32_224",
]


def load(spec: str) -> tuple[torch.nn.Module, torch.Tensor]:
    kind, name = spec.split(":", 1)
    torch.manual_seed(0)
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        shape = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    else:
        import torchvision

        kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
        shape = (1, 3, 224, 224)
    return model.eval(), torch.randn(shape)


def run_one(spec: str) -> dict:
    row: dict = {"model": spec}
    t0 = time.perf_counter()
    try:
        model, x = load(spec)
        row["params_m"] = round(n_params(model) / 1e6, 1)
        row["input"] = list(x.shape)
        result = mixfx.rewrite(model, to="fcn", example_input=x)
    except MixfxError as exc:
        result = getattr(exc, "result", None)
        row.update(outcome="refused" if result is None else "not verified", exit_code=exc.exit_code,
                   reason=exc.message[:400])
        if result is not None:
            row["classification"] = result.classification_before
    except Exception as exc:  # noqa: BLE001 - a crash is a finding
        row.update(outcome="crash", reason=f"{type(exc).__name__}: {exc}"[:400])
    else:
        v = result.verification
        sm = result.score_map
        row.update(outcome="verified" if v.passed else "not verified", classification=result.classification_before,
                   after=result.classification_after, max_rel_err=v.max_rel_err,
                   stride=list(sm.stride) if sm.stride else None, offset=list(sm.offset) if sm.offset else None,
                   receptive_field=list(sm.receptive_field) if sm.receptive_field else None,
                   output_shape=sm.output_shape, padding_free=sm.padding_free,
                   changes=[f"{c.node}: {c.after}" for c in result.changes])
    if "classification" not in row:
        try:
            row["classification"] = mixfx.analyze(*load(spec)).classification
        except Exception:  # noqa: BLE001
            row["classification"] = "?"
    row["time_s"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=SAMPLE)
    ap.add_argument("--out", default=str(RESULTS / "fcn.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'model':34} {'class':13} {'outcome':12} {'stride':7} {'rel err':8} {'time':>6}  detail")
    for spec in args.models:
        row = run_one(spec)
        rows.append(row)
        stride = "x".join(map(str, row["stride"])) if row.get("stride") else "-"
        err = f"{row['max_rel_err']:.1e}" if "max_rel_err" in row else "-"
        detail = row.get("reason") or ", ".join(row.get("output_shape") or [])
        print(f"{spec[:34]:34} {row.get('classification', '?')[:13]:13} {row['outcome']:12} {stride:7} {err:8} "
              f"{row['time_s']:6.1f}  {detail[:160]}", flush=True)
    conv = [r for r in rows if r.get("classification") == "convolutional"]
    ok = [r for r in conv if r["outcome"] == "verified"]
    others = [r for r in rows if r.get("classification") != "convolutional"]
    summary = {
        "models": len(rows), "convolutional": len(conv), "converted_and_verified": len(ok),
        "fraction": round(len(ok) / len(conv), 3) if conv else None,
        "not_convolutional": len(others),
        "not_convolutional_converted": sum(r["outcome"] == "verified" for r in others),
        "refused_not_convolutional": sum(r["outcome"] == "refused" for r in others),
        "median_time_s": round(statistics.median(r["time_s"] for r in rows), 2) if rows else None,
        "total_time_s": round(sum(r["time_s"] for r in rows), 1),
        "torch": torch.__version__,
    }
    print(f"\nconvolutional (per the analyser): {len(conv)}/{len(rows)}; converted and verified: {len(ok)}/{len(conv)}"
          f" ({100 * (summary['fraction'] or 0):.0f}%); others: {summary['not_convolutional_converted']} converted, "
          f"{summary['refused_not_convolutional']} refused; median {summary['median_time_s']} s per model")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
