"""Zoo part of `mixfx rewrite --to polymorphic`: over a sample of timm's `fixed` models (small ones,
a few per family), how many are cured (verified: equal at the example size, runs at 2 other
sizes, re-analysis not `fixed`), refused (a rigid node without a cure) or failed, by family and by
cause; beside it, measured in the same run, whether timm itself runs the model at another size
when built with `dynamic_img_size=True` (where the builder accepts it), and where both run at the
same size, how far the cured output is from timm's own (same weights).

    python bench/cure.py [--models a,b,c] [--timeout 120]

Random weights, CPU, float32. Writes bench/results/cure.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import mixfx  # noqa: E402
from mixfx.errors import MixfxError  # noqa: E402
from mixfx.rewrite import rewrite_polymorphic  # noqa: E402
from passes.cure import CureRefused  # noqa: E402

MODELS = [
    "vit_tiny_patch16_224", "vit_tiny_r_s16_p8_224", "vit_relpos_small_patch16_224", "flexivit_small",
    "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
    "cait_xxs24_224", "beit_base_patch16_224", "pit_ti_224", "pit_ti_distilled_224", "tnt_s_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_ns_224", "twins_pcpvt_small", "twins_svt_small",
    "levit_128s", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "xcit_nano_12_p16_224",
    "convit_tiny", "crossvit_tiny_240", "visformer_tiny", "coat_lite_tiny", "nest_tiny_jx",
    "efficientformer_l1", "mvitv2_tiny", "volo_d1_224", "eva02_tiny_patch14_224", "sequencer2d_s",
    "gcvit_xxtiny", "maxvit_nano_rw_256", "hiera_tiny_224", "pvt_v2_b0", "vit_small_patch16_rope_224",
]


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def family(name: str) -> str:
    return name.split("_")[0].rstrip("0123456789") if not name.startswith("vit_") else "vit"


def cause_of(change) -> str:
    """The kind of cure a change applied (from the cure pass's description of it)."""
    after = change.after
    for words, cause in (("dropped", "size check"), ("relative-position bias", "rel-pos bias"),
                         ("per window", "window mask"), ("concatenated", "coordinate map"),
                         ("resampled", "position table"), ("fold", "fold size"),
                         ("pooled (", "pooled query grid")):
        if words in after:
            return cause
    return "view sizes"


def refusal_cause(why: str) -> str:
    if "token mixing" in why:
        return "token-count weight"
    if "--to fcn" in why:
        return "flatten into Linear"
    return "no known cure: " + why.split(":")[0][:40]


def timm_dynamic(name: str, state: dict, sizes: list[tuple[int, ...]], cured) -> dict:
    """Whether timm's own `dynamic_img_size=True` runs at one of `sizes`; if the cured graph ran at
    that size too, the max abs difference of their outputs (same weights, same input)."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    except Exception as exc:  # noqa: BLE001 - the builder does not take the flag
        return {"accepted": False, "runs": False, "error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    try:
        model.load_state_dict(state)
    except Exception:  # noqa: BLE001 - different parameter layout: compare runs only
        cured = None
    for shape in sizes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                out = model(x)
        except Exception:  # noqa: BLE001
            continue
        diff = rel = None
        if cured is not None:
            try:
                with torch.no_grad():
                    diff = float((cured(x) - out).abs().max())
                rel = diff / max(float(out.abs().max()), 1e-30)
            except Exception:  # noqa: BLE001
                pass
        return {"accepted": True, "runs": True, "size": list(shape), "max_abs_vs_cured": diff,
                "max_rel_vs_cured": rel}
    return {"accepted": True, "runs": False}


def bench_one(name: str) -> dict:
    import timm

    row: dict = {"model": name, "family": family(name)}
    t0 = time.perf_counter()
    model = timm.create_model(name, pretrained=False).eval()
    shape = (1, *model.pretrained_cfg["input_size"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    report = mixfx.analyze(model, x)
    row["classification"] = report.classification
    row["rigid"] = [f"{r.kind}:{r.op}:{r.module or r.node}" for r in report.rigid_nodes]
    if report.classification != "fixed":
        row["outcome"] = "not fixed"
        row["time_s"] = round(time.perf_counter() - t0, 2)
        return row
    cured = None
    sizes: list = []
    try:
        result = rewrite_polymorphic(model, x, report_before=report)
        row["outcome"] = "cured"
        row["causes"] = sorted({cause_of(c) for c in result.changes}
                               | ({"square grid (H == W)"} if "H == W" in result.constraints else set()))
        row["changes"] = len(result.changes)
        row["constraints"] = list(result.constraints)
        row["after"] = result.classification_after
        row["max_abs_err_example"] = result.verification.max_abs_err
        sizes = [s.input_shape for s in result.verification.sizes[1:] if s.passed]
        row["runs_at"] = ["x".join(map(str, s[2:])) for s in sizes]
        cured = result.module
    except CureRefused as exc:
        row["outcome"] = "refused"
        row["causes"] = sorted({refusal_cause(u.why) for u in exc.nodes})
        row["why"] = exc.message[:300]
    except MixfxError as exc:
        row["outcome"] = "failed"
        row["why"] = f"{type(exc).__name__}: {exc.message[:300]}"
    from mixfx.rewrite import second_sizes

    probe = sizes or second_sizes(x)[:2]
    row["timm_dynamic"] = timm_dynamic(name, model.state_dict(), [tuple(s) for s in probe], cured)
    row["time_s"] = round(time.perf_counter() - t0, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated timm names (default: the built-in sample)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else MODELS
    torch.set_num_threads(1)
    rows = []
    console = Console(width=100)
    t_all = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    for name in names:
        signal.alarm(args.timeout)
        try:
            row = bench_one(name)
        except Timeout:
            row = {"model": name, "family": family(name), "outcome": "failed", "why": f"timeout {args.timeout}s"}
        except Exception as exc:  # noqa: BLE001 - a crash is a finding
            row = {"model": name, "family": family(name), "outcome": "failed",
                   "why": f"crash {type(exc).__name__}: {str(exc)[:200]}"}
        finally:
            signal.alarm(0)
        rows.append(row)
        console.print(f"{name}: {row['outcome']} {row.get('causes', '')} {row.get('why', '')[:150]} "
                      f"timm-dyn={row.get('timm_dynamic', {}).get('runs')} ({row.get('time_s', '?')} s)")
    summary = summarise(rows)
    summary["wall_s"] = round(time.perf_counter() - t_all, 1)
    render(rows, summary, console)
    out = HERE / "results" / "cure.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows, "torch": torch.__version__}, indent=2))
    console.print(f"wrote {out}")


def summarise(rows: list[dict]) -> dict:
    fixed = [r for r in rows if r["outcome"] in ("cured", "refused", "failed")]
    counts = defaultdict(int)
    for r in fixed:
        counts[r["outcome"]] += 1
    by_cause: dict = defaultdict(lambda: defaultdict(int))
    for r in fixed:
        for c in r.get("causes", ["-"]):
            by_cause[c][r["outcome"]] += 1
    timm_runs = [r for r in fixed if r.get("timm_dynamic", {}).get("runs")]
    cured_where_timm = [r for r in timm_runs if r["outcome"] == "cured"]
    diffs = [r["timm_dynamic"]["max_rel_vs_cured"] for r in cured_where_timm
             if r["timm_dynamic"].get("max_rel_vs_cured") is not None]
    return {"models": len(rows), "fixed": len(fixed), **counts,
            "not_fixed": len(rows) - len(fixed),
            "timm_dynamic_runs": len(timm_runs), "cured_where_timm_runs": len(cured_where_timm),
            "max_rel_vs_timm_dynamic": max(diffs) if diffs else None,
            "by_cause": {k: dict(v) for k, v in by_cause.items()}}


def render(rows: list[dict], summary: dict, console: Console) -> None:
    table = Table(title="mixfx rewrite --to polymorphic over timm fixed models")
    for col in ("model", "outcome", "causes", "timm dyn"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if r["outcome"] == "not fixed":
            continue
        dyn = r.get("timm_dynamic", {})
        dyn_text = "n/a" if not dyn.get("accepted") else ("runs" if dyn.get("runs") else "fails")
        table.add_row(r["model"], r["outcome"], ", ".join(r.get("causes", [])) or r.get("why", "")[:60], dyn_text)
    console.print(table)
    causes = Table(title="by cause (a model counts under each of its causes)")
    for col in ("cause", "cured", "refused", "failed"):
        causes.add_column(col)
    for cause, c in sorted(summary["by_cause"].items()):
        causes.add_row(cause, str(c.get("cured", 0)), str(c.get("refused", 0)), str(c.get("failed", 0)))
    console.print(causes)
    console.print(f"fixed {summary['fixed']} of {summary['models']}: cured {summary.get('cured', 0)}, "
                  f"refused {summary.get('refused', 0)}, failed {summary.get('failed', 0)}; timm dynamic_img_size "
                  f"runs {summary['timm_dynamic_runs']}, of which cured {summary['cured_where_timm_runs']} "
                  f"(max rel diff vs timm {summary['max_rel_vs_timm_dynamic']}); {summary['wall_s']} s")


if __name__ == "__main__":
    main()
