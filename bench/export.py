"""Export bench (issue 18): mixfx export vs torch.export with Dim.AUTO, in the same run.

    python bench/export.py                      # the default sample (24 models)
    python bench/export.py --models resnet50,vit_tiny_patch16_224 --timeout 300

The models: the zoo's (bench/results/zoo.csv) convolutional and polymorphic timm models up to
--max-params million parameters, a family sample (one model per family), --limit of them
spread evenly over the parameter counts. Random weights (timm zero-initialised parameters get
small random values, so a wrong export shows numerically). Example input: the model's default
size. Per model, in a forked child with a timeout:
- Dim.AUTO: `torch.export.export(model, (x,), dynamic_shapes={x: {2: AUTO, 3: AUTO}})` (within
  --auto-budget CPU seconds: past it, "not exported"), then
  the program runs at the two other sizes mixfx verifies at (H != W) and is compared with eager
  (max abs err <= 1e-4 * max|out|): "runs" only if both match;
- mixfx: `mixfx.export(model, x, "m.onnx")` and `("m.pt2")`, each loaded (onnxruntime CPU /
  torch.export.load) and verified at the example and the two other sizes.
Prints a table, writes bench/results/export.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, build_timm, other_size_candidates, other_sizes, timm_input_shape  # noqa: E402

ZOO_CSV = RESULTS / "zoo.csv"
OUT_JSON = RESULTS / "export.json"
RTOL = 1e-4


def _short(exc: BaseException, n: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:n]


def sample(max_params: float, limit: int) -> list[dict]:
    rows = list(csv.DictReader(ZOO_CSV.open()))
    ok = [r for r in rows if r["classification"] in ("convolutional", "polymorphic")
          and r["params_m"] and float(r["params_m"]) <= max_params]
    ok.sort(key=lambda r: float(r["params_m"]))
    if len(ok) <= limit:
        return ok
    return [ok[round(i * (len(ok) - 1) / (limit - 1))] for i in range(limit)]  # spread over the sizes


def _close(got, ref) -> bool:
    import torch

    from mixfx.shapes import flatten_outputs

    a, b = flatten_outputs(got), flatten_outputs(ref)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        scale = float(y.abs().max()) if y.numel() else 0.0
        if float((x.double() - y.double()).abs().max()) > RTOL * max(scale, 1e-30):
            return False
    return bool(torch.isfinite(b[0]).all())


def _first_running(model, candidates: list) -> tuple | None:
    import torch

    for shape in candidates:
        try:
            with torch.no_grad():
                model(torch.randn(shape))
            return shape
        except Exception:  # noqa: BLE001
            continue
    return None


def run_one(name: str, opts: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import mixfx
    from torch.export import Dim

    from zoo import _randomise_zero_parameters

    row: dict = {"name": name}
    model = build_timm(name, meta=False)
    _randomise_zero_parameters(model)
    shape = timm_input_shape(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    row["input"] = "x".join(map(str, shape))
    folder = Path(tempfile.mkdtemp(prefix="mixfx-export-bench-"))
    sizes = None
    shapes = None  # the pt2 export reuses the onnx export's analysis (timed with the onnx one)
    for fmt in ("onnx", "pt2"):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = mixfx.export(model, x, folder / f"{name}.{fmt}", shapes=shapes)
            shapes = result.shapes
            row[f"{fmt}_verified"] = result.verified
            row["spec"] = "; ".join(d.formula() for d in result.shapes.dims)
            row["spec_source"] = result.dynamic_shapes_used
            row["static"] = result.shapes.static
            sizes = sizes or [tuple(c.input_shape) for c in result.checks[1:]]
            row[f"{fmt}_max_rel_err"] = max(c.max_rel_err for c in result.checks)
        except Exception as exc:  # noqa: BLE001 - recorded as the cause
            row[f"{fmt}_verified"] = False
            res = getattr(exc, "result", None)
            if res is not None:
                shapes = res.shapes
                bad = next((c for c in res.checks if not c.passed), None)
                row["spec"] = "; ".join(d.formula() for d in res.shapes.dims)
                row["spec_source"] = res.dynamic_shapes_used
                row[f"{fmt}_error"] = (f"at {'x'.join(map(str, bad.input_shape))}: "
                                       f"{bad.error or f'rel err {bad.max_rel_err:.2g}'}") if bad else _short(exc)
            else:
                row[f"{fmt}_error"] = _short(exc)
        row[f"{fmt}_s"] = round(time.perf_counter() - t0, 2)
        row[f"{fmt}_cpu_s"] = round(time.process_time() - c0, 2)  # wall time on a shared machine is load
        for f in folder.iterdir():
            f.unlink()
    folder.rmdir()
    if not sizes:  # a static export: for Dim.AUTO, the first of each fallback list the eager model runs at
        sizes = [s for s in (_first_running(model, cands) for cands in other_size_candidates(shape)) if s]
        sizes = sizes or other_sizes(shape)
    row["other_sizes"] = ["x".join(map(str, s[2:])) for s in sizes]
    # Dim.AUTO, at the same two other sizes
    t0, c0 = time.perf_counter(), time.process_time()
    arg = mixfx.export_shapes.forward_arg_name(model) if hasattr(mixfx, "export_shapes") else "x"
    from mixfx.shapes import SymbolicBudgetExceeded, time_budget

    try:  # a budget, so a trace that runs for many minutes (HaloNet's) fails this column, not the row
        with time_budget(opts["auto_budget"]):
            program = torch.export.export(model, (x,), dynamic_shapes={arg: {2: Dim.AUTO, 3: Dim.AUTO}})
        row["auto_exported"] = True
    except SymbolicBudgetExceeded:
        row["auto_exported"] = False
        row["auto_error"] = f"torch.export did not finish within {opts['auto_budget']:g} CPU s"
    except Exception as exc:  # noqa: BLE001
        row["auto_exported"] = False
        row["auto_error"] = _short(exc)
    if row["auto_exported"]:
        module = program.module()
        runs = True
        for s in sizes:
            y = torch.randn(s, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                try:
                    ref = model(y)
                except Exception as exc:  # noqa: BLE001 - the model's own constraint, not AUTO's
                    row["auto_error"] = f"at {'x'.join(map(str, s[2:]))}: the eager model fails ({_short(exc, 80)})"
                    runs = False
                    break
                try:
                    ok = _close(module(y), ref)
                    if not ok:
                        row["auto_error"] = f"at {'x'.join(map(str, s[2:]))}: output differs from eager"
                except Exception as exc:  # noqa: BLE001 - specialised: refuses the size
                    ok = False
                    row["auto_error"] = f"at {'x'.join(map(str, s[2:]))}: {_short(exc, 120)}"
            runs = runs and ok
            if not ok:
                break
        row["auto_runs"] = runs
    else:
        row["auto_runs"] = False
    row["auto_s"] = round(time.perf_counter() - t0, 2)
    row["auto_cpu_s"] = round(time.process_time() - c0, 2)
    return row


def _child(conn, name, opts):
    try:
        conn.send(run_one(name, opts))
    except BaseException as exc:  # noqa: BLE001
        conn.send({"name": name, "crash": _short(exc)})
    finally:
        conn.close()


def run_all(names: list[str], meta: dict[str, dict], opts: dict, out: Path | None = None) -> list[dict]:
    ctx = mp.get_context("fork")
    rows = []
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(child, name, opts), daemon=True)
        p.start()
        child.close()
        if parent.poll(opts["timeout"]):
            try:
                row = parent.recv()
            except EOFError:
                row = {"name": name, "crash": "child died"}
        else:
            row = {"name": name, "crash": f"timeout after {opts['timeout']} s"}
        p.kill()
        p.join()
        row.update({"family": meta[name]["family"], "params_m": float(meta[name]["params_m"]),
                    "classification": meta[name]["classification"],
                    "total_s": round(time.perf_counter() - t0, 1)})
        rows.append(row)
        print(f"[{i}/{len(names)}] {name}: auto {'ok' if row.get('auto_runs') else 'no'}, "
              f"onnx {'ok' if row.get('onnx_verified') else 'no'}, pt2 {'ok' if row.get('pt2_verified') else 'no'}, "
              f"{row['total_s']} s" + (f" [{_cause(row)}]" if _cause(row) else "")
              + ("" if row.get("auto_runs") else f" [AUTO: {row.get('auto_error', row.get('crash', '?'))}]"),
              flush=True)
        if out is not None:  # after every model: an interrupted run keeps what it measured
            out.write_text(json.dumps({"summary": summarise(rows), "rows": rows}, indent=2, default=str))
    return rows


def _cause(row: dict) -> str:
    if "crash" in row:
        return row["crash"]
    parts = []
    for key in ("onnx", "pt2"):
        if not row.get(f"{key}_verified"):
            parts.append(f"{key}: {row.get(f'{key}_error', '?')}")
    return "; ".join(parts)


def summarise(rows: list[dict]) -> dict:
    n = len(rows)

    def share(pred) -> dict:
        k = sum(1 for r in rows if pred(r))
        return {"count": k, "share": round(k / n, 3) if n else 0.0}

    def median(key):
        vals = [r[key] for r in rows if key in r]
        return round(statistics.median(vals), 2) if vals else None

    return {
        "models": n,
        "auto_exported": share(lambda r: r.get("auto_exported")),
        "auto_runs_at_both_other_sizes": share(lambda r: r.get("auto_runs")),
        "mixfx_onnx_verified": share(lambda r: r.get("onnx_verified")),
        "mixfx_pt2_verified": share(lambda r: r.get("pt2_verified")),
        "mixfx_both_verified": share(lambda r: r.get("onnx_verified") and r.get("pt2_verified")),
        "mixfx_dynamic_and_verified": share(lambda r: r.get("onnx_verified") and r.get("pt2_verified")
                                            and not r.get("static")),
        "median_s": {"auto": median("auto_s"), "mixfx_onnx": median("onnx_s"), "mixfx_pt2": median("pt2_s")},
    }


def print_table(rows: list[dict], summary: dict) -> None:
    print()
    print(f"{'model':28} {'M':>5} {'class':5} {'AUTO':5} {'onnx':5} {'pt2':5} {'auto s':>6} {'onnx s':>6} {'pt2 s':>6}")
    for r in rows:
        def mark(k):
            return "ok" if r.get(k) else "-"
        print(f"{r['name'][:28]:28} {r['params_m']:5.1f} {r['classification'][:5]:5} {mark('auto_runs'):5} "
              f"{mark('onnx_verified'):5} {mark('pt2_verified'):5} {r.get('auto_s', float('nan')):6.1f} "
              f"{r.get('onnx_s', float('nan')):6.1f} {r.get('pt2_s', float('nan')):6.1f}")
    n = summary["models"]
    print()
    for key in ("auto_exported", "auto_runs_at_both_other_sizes", "mixfx_onnx_verified", "mixfx_pt2_verified",
                "mixfx_both_verified", "mixfx_dynamic_and_verified"):
        print(f"{key:32} {summary[key]['count']:3}/{n}  ({100 * summary[key]['share']:.1f}%)")
    print(f"median seconds per model: {summary['median_s']}")
    print()
    for r in rows:
        if not (r.get("onnx_verified") and r.get("pt2_verified")):
            print(f"mixfx not verified: {r['name']}: {_cause(r)}")
    for r in rows:
        if not r.get("auto_runs"):
            print(f"Dim.AUTO fails: {r['name']}: {r.get('auto_error', r.get('crash', '?'))}")
    for r in rows:
        if r.get("auto_runs") and not (r.get("onnx_verified") and r.get("pt2_verified")):
            print(f"Dim.AUTO ahead of mixfx: {r['name']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated timm names (default: the zoo sample)")
    ap.add_argument("--max-params", type=float, default=30.0, help="million parameters (default 30)")
    ap.add_argument("--limit", type=int, default=24, help="models in the default sample (default 24)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    ap.add_argument("--auto-budget", type=float, default=120.0,
                    help="CPU seconds for the Dim.AUTO export (default 120)")
    ap.add_argument("--out", default=str(OUT_JSON))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    zoo = {r["name"]: r for r in csv.DictReader(ZOO_CSV.open())}
    if args.models:
        names = args.models.split(",")
        meta = {n: zoo.get(n, {"family": "?", "params_m": "nan", "classification": "?"}) for n in names}
    else:
        chosen = sample(args.max_params, args.limit)
        names = [r["name"] for r in chosen]
        meta = {r["name"]: r for r in chosen}
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    rows = run_all(names, meta, {"timeout": args.timeout, "auto_budget": args.auto_budget}, Path(args.out))
    summary = summarise(rows)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(rows, summary)
    print(f"wall time: {summary['wall_s']} s")
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
