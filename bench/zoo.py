"""The real-model corpus: mixfx's analyser and both rewrites over timm's model registry (issue 5).

    python bench/zoo.py --family-sample --jobs 2          # smallest model of every timm family
    python bench/zoo.py --all --jobs 2 --timeout 300      # the whole registry
    python bench/zoo.py --models resnet18,vit_tiny_patch16_224   # a hand-picked list
    python bench/zoo.py --summary-only                    # rebuild the markdown from the CSV

For each architecture (random weights, nothing downloaded), in its own forked process with a
timeout (a crash or hang only loses that row):
1. build on the meta device, trace + analyse (tracer, class, rigid nodes, head, constraints, time);
2. concrete confirmation, the ground truth: real forwards on CPU (batch 1, random weights) at the
   default size and two other sizes with H != W (H-32 x W-64, the size `mixfx.rewrite` verifies
   at, and ~0.75H x 1.125W; multiples of 32, else 64, else 128), for models up to --forward-limit
   parameters. "fixed" must fail at one of the other sizes, "convolutional"/"polymorphic" must
   run at both;
3. `mixfx.rewrite(--to conv)` and `(--to linear)` with numeric verification, for models up to
   --rewrite-limit parameters. The ground truth's forwards run on the verification's seeded
   inputs and are shared with both verifications (`reference_outputs`), so the rewrite times
   leave out the original's forwards at those sizes;
4. the independent oracles of bench/oracles.py (written apart from the analyser: torch and the
   eager model only): a size search over ~64 candidate sizes (meta forwards, the cheapest runs
   confirmed by real forwards) says fixed or not; a perturbation probe (float64, real forwards, the
   widest input within --probe-flops) says whether perturbing one end of the input changes the far
   end of the pre-head map (global) or not (local). Both are compared with mixfx's verdicts:
   `fixed` vs not, and `global_mixing`/`global_context` non-empty vs the far end changing. Models
   over --forward-limit get the size search on meta forwards only and no probe;
recording time and the growth of peak RSS of each step. Rows are appended to bench/results/zoo.csv
as they finish (re-running skips the names already there: resumable); bench/results/zoo_summary.md
is rebuilt at the end (per family and overall).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (RESULTS, build_timm, families, family_candidates, maxrss_mb, n_params,  # noqa: E402
                     other_size_candidates, quantile, timed, timm_input_shape)

CSV_PATH = RESULTS / "zoo.csv"
MD_PATH = RESULTS / "zoo_summary.md"

FIELDS = [
    "name", "family", "params_m", "status", "error_stage", "error",
    "tracer", "trace_attempts", "classification", "fully_convolutional", "n_rigid", "rigid", "head",
    "constraints", "output_shape", "internal_disagreements",
    "build_meta_s", "analysis_s", "trace_s", "symbolic_s", "symbolic_stopped", "analysis_mb",
    "concrete", "concrete_runs", "concrete_verdict", "agrees", "concrete_s", "concrete_mb",
    "conv_status", "conv_changes", "conv_skipped", "conv_linear_before", "conv_linear_after",
    "conv_max_abs_err", "conv_s", "conv_mb", "conv_error",
    "linear_status", "linear_changes", "linear_skipped", "linear_conv1x1_before", "linear_conv1x1_after",
    "linear_max_abs_err", "linear_s", "linear_mb", "linear_error",
    "global_mixing", "global_context",
    "oracle_fixed", "oracle_confirmed", "oracle_tried", "oracle_runs", "oracle_fails", "oracle_refuted",
    "oracle_divisors", "oracle_count_stride", "oracle_grid_stride", "fixed_agrees", "oracle_s",
    "probe", "probe_size", "probe_rf", "probe_map", "probe_changed", "probe_resizes", "probe_reason",
    "mixfx_global", "locality_agrees", "probe_s", "oracle_error",
    "peak_rss_mb", "total_s",
]


def _short(exc: BaseException, n: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return text[:n]


def _count(module, kind: str) -> int:
    import torch.nn as nn

    if kind == "linear":
        return sum(isinstance(m, nn.Linear) for m in module.modules())
    return sum(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) for m in module.modules())


def _randomise_zero_parameters(model) -> None:
    """timm zero-initialises some heads, gates and layer scales; with them the output is
    identically zero (or blind to whole branches) and a rewrite's numeric check proves nothing.
    Such parameters get small random values (the rewrite must hold for any weights)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# ----------------------------------------------------------------------------- one model (child)
def run_one(name: str, family: str, candidates: list[str], opts: dict) -> dict:
    """Everything for one architecture. `candidates` (family-sample mode): pick the one with the
    fewest parameters, counted on the meta device."""
    import torch

    torch.set_num_threads(1)
    import mixfx
    import mixfx.analysis  # noqa: F401 - imported (and compiled) outside the timed analysis
    from mixfx.verify import reference_output

    row: dict = {"name": name, "family": family, "status": "ok"}
    t_start = time.perf_counter()
    stage = "build"
    try:
        with timed(row, "build_meta"):
            if candidates:
                best = None
                for cand in candidates:
                    try:
                        m = build_timm(cand, meta=True)
                    except Exception:  # noqa: BLE001
                        continue
                    p = n_params(m)
                    if best is None or p < best[0]:
                        best = (p, cand, m)
                if best is None:
                    raise RuntimeError(f"none of {candidates} builds")
                _, name, model = best
                row["name"] = name
            else:
                model = build_timm(name, meta=True)
        params = n_params(model)
        row["params_m"] = round(params / 1e6, 3)
        shape = timm_input_shape(model)
        x_meta = torch.empty(shape, device="meta")

        stage = "analysis"
        with timed(row, "analysis"):
            rep = mixfx.analyze(model, x_meta, name=name)
        row["tracer"] = rep.tracer
        row["trace_attempts"] = " | ".join(a.replace("\n", " ")[:160] for a in getattr(rep, "notes", [])
                                           if a.startswith("Tracer fallback"))[:400]
        row["classification"] = rep.classification
        row["fully_convolutional"] = rep.fully_convolutional
        row["n_rigid"] = len(rep.rigid_nodes)
        row["rigid"] = "; ".join(f"{r.module or r.node}|{r.op}|{r.kind}" for r in rep.rigid_nodes)[:600]
        row["head"] = f"{rep.head.module or rep.head.node}|{rep.head.op}" if rep.head else ""
        row["constraints"] = "; ".join(map(str, rep.constraints))[:400]
        row["output_shape"] = str(rep.output_shape)[:200]
        row["internal_disagreements"] = " | ".join(map(str, rep.disagreements))[:400]
        row["trace_s"] = round(rep.timings.get("trace_s", 0.0), 4)
        row["symbolic_s"] = round(rep.timings.get("symbolic_s", 0.0), 4)
        row["global_mixing"] = "; ".join(f"{g.module or g.node}|{g.op}" for g in rep.global_mixing)[:400]
        # issue 13's `global_context` (SE gates, norm statistics over H, W): absent or empty
        # before the analyser fills it
        context = list(getattr(rep, "global_context", None) or [])
        row["global_context"] = "; ".join(f"{g.module or g.node}|{g.op}" for g in context)[:400]
        mixfx_global = bool(rep.global_mixing) or bool(context)
        row["mixfx_global"] = mixfx_global
        row["symbolic_stopped"] = next(((("budget" if "budget" in n else "failure") + ": " + n.split(":")[0][29:])[:140]
                                        for n in rep.notes if n.startswith("Symbolic propagation stopped")), "")
        del model

        # ---- concrete confirmation (ground truth). The original's outputs go into one dict that
        # both rewrites' verifications share: the default size and the first other size are the
        # verification's inputs, so the original runs once per input in all.
        stage = "concrete"
        reference_outputs: dict = {}
        real = None
        if params > opts["forward_limit"]:
            row["concrete"] = f"skipped (> {opts['forward_limit'] / 1e6:g}M params)"
        else:
            with timed(row, "concrete"):
                torch.manual_seed(0)
                real = build_timm(name, meta=False)
                _randomise_zero_parameters(real)
                runs = []
                oks = []

                def runs_at(s) -> bool:
                    try:  # on verification's seeded input: the rewrites below reuse the output
                        reference_output(real, s, reference_outputs)
                        runs.append(f"{s[2]}x{s[3]}:ok")
                        return True
                    except Exception as exc:  # noqa: BLE001
                        runs.append(f"{s[2]}x{s[3]}:fail({_short(exc, 80)})")
                        return False

                oks.append(runs_at(shape))
                if oks[0]:
                    # each other size: the first rounding that runs (32, then 64, then 128), then
                    # the size mixfx itself probed on meta tensors (which keeps the constraints it
                    # found): a real forward decides either way
                    probed = [tuple(c.input_shape) for c in rep.concrete_checks[1:3]]
                    for i, cands in enumerate(other_size_candidates(shape)):
                        extra = [probed[i]] if i < len(probed) and probed[i] not in cands else []
                        oks.append(any(runs_at(s) for s in cands + extra))
                row["concrete_runs"] = "; ".join(runs)
            if not oks[0]:
                row["concrete"] = "default size failed"
            else:
                row["concrete"] = "ran"
                verdict = "runs_all" if all(oks[1:]) else ("fails_all" if not any(oks[1:]) else "fails_some")
                row["concrete_verdict"] = verdict
                expect_fixed = rep.classification == "fixed"
                row["agrees"] = (verdict != "runs_all") if expect_fixed else (verdict == "runs_all")

        # ---- the independent oracles (bench/oracles.py: nothing from mixfx)
        if opts.get("oracles", True):
            stage = "oracles"
            _run_oracles(row, name, shape, real if row.get("concrete") == "ran" else None,
                         rep.classification == "fixed", mixfx_global, opts)

        # ---- rewrites
        for target, key, counted in (("conv", "conv", "linear"), ("linear", "linear", "conv1x1")):
            stage = f"rewrite_{target}"
            if params > opts["rewrite_limit"] or real is None or row.get("concrete") != "ran":
                row[f"{key}_status"] = (f"skipped (> {opts['rewrite_limit'] / 1e6:g}M params)"
                                        if params > opts["rewrite_limit"] else "skipped (no runnable model)")
                continue
            before_name = f"{key}_{counted}_before"
            after_name = f"{key}_{counted}_after"
            row[before_name] = _count(real, counted)
            try:
                with timed(row, key):
                    res = mixfx.rewrite(real, to=target, example_input=torch.randn(shape), analyze=False,
                                        reference_outputs=reference_outputs)
                row[f"{key}_status"] = ("MISMATCH" if not res.verification.passed
                                        else "degenerate" if res.verification.degenerate else "verified")
                row[f"{key}_changes"] = len(res.changes)
                row[f"{key}_skipped"] = len(res.skipped)
                row[after_name] = _count(res.module, counted)
                row[f"{key}_max_abs_err"] = f"{res.verification.max_abs_err:.3g}"
                if res.skipped:
                    reasons = sorted({s.reason[:90] for s in res.skipped})
                    row[f"{key}_error"] = ("skipped: " + " / ".join(reasons))[:300]
            except Exception as exc:  # noqa: BLE001
                vname = type(exc).__name__
                row[f"{key}_status"] = "verify_failed" if vname == "VerificationError" else "error"
                row[f"{key}_error"] = _short(exc)
                res = getattr(exc, "result", None)
                if res is not None and res.verification is not None:
                    row[f"{key}_max_abs_err"] = f"{res.verification.max_abs_err:.3g}"
                    row[f"{key}_changes"] = len(res.changes)
    except Exception as exc:  # noqa: BLE001
        row["status"] = "error"
        row["error_stage"] = stage
        row["error"] = _short(exc, 400)
        if opts.get("debug"):
            traceback.print_exc()
    row["peak_rss_mb"] = round(maxrss_mb(), 1)
    row["total_s"] = round(time.perf_counter() - t_start, 3)
    return row


def _sizes(sizes, n: int = 6) -> str:
    return ", ".join("x".join(map(str, s)) for s in list(sizes)[:n]) + (" ..." if len(sizes) > n else "")


def _run_oracles(row: dict, name: str, shape: tuple, real, mixfx_fixed: bool, mixfx_global: bool,
                 opts: dict) -> None:
    """Size search and perturbation probe on a fresh build of the model (meta copy for the search,
    the real model for confirmations and the probe), compared with mixfx's verdicts. An oracle
    that crashes costs its own columns only."""
    import torch

    from oracles import perturbation_probe, size_search

    try:
        with timed(row, "oracle"):
            meta = build_timm(name, meta=True)
            search = size_search(real if real is not None else meta, shape, meta_model=meta,
                                 real=real is not None, time_budget=opts.get("oracle_time", 10.0))
        row["oracle_tried"] = len(search.tried)
        row["oracle_confirmed"] = "real" if search.confirmed_real else "meta only"
        # the first size that ran for real decides; the others ran on the meta device
        confirmed = search.runs[:1] if search.confirmed_real else []
        row["oracle_runs"] = ((f"real {_sizes(confirmed)}; meta " if confirmed else "") + _sizes(search.runs[len(confirmed):]))
        row["oracle_fails"] = " | ".join(f"{'x'.join(map(str, s))}: {e[:70]}"
                                         for s, e in list(search.fails.items())[:2])[:200]
        row["oracle_refuted"] = _sizes(search.refuted)
        row["oracle_divisors"] = "x".join(map(str, search.divisors))
        row["oracle_count_stride"] = search.count_stride or ""
        row["oracle_grid_stride"] = search.grid_stride or ""
        if search.fixed is not None:
            row["oracle_fixed"] = search.fixed
            row["fixed_agrees"] = search.fixed == mixfx_fixed
        elif search.example_error:
            row["oracle_fixed"] = "example fails"
        else:
            row["oracle_fixed"] = f"undecided (sweep stopped after {len(search.tried)} sizes)"
        if real is None:
            row["probe"] = "skipped (no real forward)"
            return
        torch.manual_seed(0)
        with timed(row, "probe"):
            probe = perturbation_probe(real, shape, search, meta_model=meta,
                                       flop_budget=opts.get("probe_flops", 4e9))
        row["probe"] = probe.verdict
        row["probe_size"] = "x".join(map(str, probe.probe_size)) if probe.probe_size else ""
        row["probe_rf"] = probe.rf_estimate or ""
        row["probe_map"] = f"{probe.map_module or 'forward'}: {(probe.map_key or '').split('@')[0]}" if probe.map_key else ""
        row["probe_changed"] = (f"{probe.left_changed}/{probe.right_changed}/{probe.both_changed} of {probe.map_numel}"
                                if probe.map_numel else "")
        row["probe_resizes"] = probe.resizes_input
        row["probe_reason"] = probe.reason[:300]
        if probe.far_end_changes is not None:
            row["locality_agrees"] = probe.far_end_changes == mixfx_global
    except Exception as exc:  # noqa: BLE001
        row["oracle_error"] = _short(exc)
        if opts.get("debug"):
            traceback.print_exc()


def _child(conn, name, family, candidates, opts):
    try:
        row = run_one(name, family, candidates, opts)
    except BaseException as exc:  # noqa: BLE001
        row = {"name": name, "family": family, "status": "error", "error_stage": "worker", "error": _short(exc)}
    conn.send(row)
    conn.close()


# ----------------------------------------------------------------------------- driver
def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def _append(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in FIELDS})
        f.flush()
        os.fsync(f.fileno())


def run_all(tasks: list[tuple[str, str, list[str]]], jobs: int, timeout: float, opts: dict, out: Path) -> None:
    """tasks: (name, family, candidates). One forked process per task, at most `jobs` at a time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    ctx = mp.get_context("fork")
    pending = list(tasks)
    running: dict = {}  # proc -> (conn, task, t0)
    with Progress(TextColumn("[bold]zoo"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.description}")) as bar:
        tid = bar.add_task("", total=len(tasks))
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                parent, child = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(child, *task, opts), daemon=True)
                p.start()
                child.close()
                running[p] = (parent, task, time.perf_counter())
            time.sleep(0.05)
            for p in list(running):
                conn, task, t0 = running[p]
                row = None
                if conn.poll():
                    try:
                        row = conn.recv()
                    except EOFError:
                        row = None
                    p.join(5)
                    if row is None:
                        row = {"status": "crash", "error_stage": "worker", "error": f"worker died (exit {p.exitcode})"}
                elif not p.is_alive():
                    p.join()
                    row = {"status": "crash", "error_stage": "worker",
                           "error": f"worker died without a result (exit code {p.exitcode})"}
                elif time.perf_counter() - t0 > timeout:
                    p.kill()
                    p.join()
                    row = {"status": "timeout", "error_stage": "worker", "error": f"timeout after {timeout:g}s"}
                if row is None:
                    continue
                row.setdefault("name", task[0])
                row.setdefault("family", task[1])
                row.setdefault("total_s", round(time.perf_counter() - t0, 2))
                _append(out, row)
                conn.close()
                del running[p]
                bar.update(tid, advance=1, description=f"{row['name']}: {row.get('classification') or row['status']}")


# ----------------------------------------------------------------------------- summary
def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}% ({a}/{b})" if b else "n/a"


def _cell(text, n: int = 220) -> str:
    return str(text or "").replace("|", "/").replace("\n", " ")[:n]


def fixed_cause(r: dict) -> str:
    """Why mixfx's fixed/not verdict and the size search's disagree, from what the row recorded."""
    if r.get("oracle_fixed") == "True":
        return (f"no other size runs ({r.get('oracle_tried')} tried, {r.get('oracle_confirmed')}), e.g. "
                f"{r.get('oracle_fails')}; mixfx says {r['classification']}")
    parts = [f"runs at {r.get('oracle_runs')}"]
    if r.get("oracle_count_stride"):
        parts.append("every size that runs keeps the example's number of positions within rounding (a fixed "
                     "count of positions, not a fixed size)")
    if r.get("oracle_grid_stride"):
        parts.append(f"every size that runs falls on the example's grid at stride {r['oracle_grid_stride']} "
                     "(only the remainder pixels differ)")
    if r.get("probe_resizes") == "True":
        parts.append("the input is resized to a constant size first")
    if r.get("symbolic_stopped"):
        parts.append(f"mixfx's symbolic run stopped ({r['symbolic_stopped'][:60]})")
    parts.append(f"mixfx's rigid nodes: {(r.get('rigid') or 'none')[:120]}")
    return "; ".join(parts)


def locality_cause(r: dict) -> str:
    mixfx = "; ".join(x for x in (r.get("global_mixing"), r.get("global_context")) if x)
    if r.get("probe") == "local":
        return f"mixfx reports {mixfx[:120]}; probe: {r.get('probe_reason')}"
    rigid = f" (rigid nodes: {r['rigid'][:100]})" if r.get("rigid") else ""
    return f"probe: {r.get('probe_reason')}; mixfx reports no global mixing or context{rigid}"


def _oracle_section(ok: list[dict]) -> list[str]:
    """Agreement of mixfx's verdicts with the two independent oracles, each disagreement with its
    cause."""
    judged = [r for r in ok if r.get("fixed_agrees") in ("True", "False")]
    if not judged and not any(r.get("probe") for r in ok):
        return []
    real = [r for r in judged if r.get("oracle_confirmed") == "real"]
    probed = [r for r in ok if r.get("locality_agrees") in ("True", "False")]
    incon = [r for r in ok if r.get("probe") == "inconclusive"]
    errs = [r for r in ok if r.get("oracle_error")]
    lines = ["", "## Independent oracles (bench/oracles.py)", "",
             "Written apart from the analyser (torch and the eager model only). Size search: ~96 candidate "
             "sizes (H != W, never 1, multiples of 7 to 256 and nearby odd sizes, smaller and larger, including "
             "the example's pixel count in other shapes); meta forwards, the cheapest runs confirmed by real "
             "forwards (`fixed` iff no other size runs). Perturbation probe: float64 real forwards on the widest "
             "affordable input; perturb an 8-px strip at each end; the far end changes iff some element of the "
             "pre-head map (the last tensor whose shape varies with the input) changes under both; disjoint ends "
             "mean local at any width, overlapping ends mean global from four times an independent receptive-field "
             "estimate (conv/pool kernels whose input follows the input's width) on.", "",
             "| metric | value |", "|---|---|",
             f"| fixed vs not: mixfx agrees with the size search | {_pct(sum(r['fixed_agrees'] == 'True' for r in judged), len(judged))} |",
             f"| ... where the search's runs were confirmed by real forwards | {_pct(sum(r['fixed_agrees'] == 'True' for r in real), len(real))} |",
             f"| local vs global: mixfx (global_mixing or global_context non-empty) agrees with the probe | "
             f"{_pct(sum(r['locality_agrees'] == 'True' for r in probed), len(probed))} |",
             f"| probe conclusive: global / local / inconclusive / skipped (too large) | "
             f"{sum(r.get('probe') == 'global' for r in ok)} / {sum(r.get('probe') == 'local' for r in ok)} / "
             f"{len(incon)} / {sum(str(r.get('probe', '')).startswith('skipped') for r in ok)} |",
             f"| oracle errors | {len(errs)} |"]
    reasons: dict[str, int] = {}
    for r in incon:
        why = re.sub(r"\(.*", "", re.sub(r"[0-9]+", "N", r.get("probe_reason") or ""))[:80].strip()
        reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        lines += ["", "Probe inconclusive: " + "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) + "."]
    lines += ["", "### Disagreements: fixed vs not", ""]
    dis = [r for r in judged if r["fixed_agrees"] == "False"]
    if dis:
        lines += ["| model | mixfx | size search | cause |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['classification']} | {'fixed' if r['oracle_fixed'] == 'True' else 'not fixed'} | "
                  f"{_cell(fixed_cause(r), 400)} |" for r in dis]
    else:
        lines.append("None.")
    lines += ["", "### Disagreements: local vs global", ""]
    dis = [r for r in probed if r["locality_agrees"] == "False"]
    if dis:
        lines += ["| model | mixfx | probe | cause |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {'global' if r.get('mixfx_global') == 'True' else 'local'} | {r['probe']} at "
                  f"{r.get('probe_size')} | {_cell(locality_cause(r), 400)} |" for r in dis]
    else:
        lines.append("None.")
    if errs:
        lines += ["", "### Oracle errors", "", "| model | error |", "|---|---|"]
        lines += [f"| {r['name']} | {_cell(r['oracle_error'])} |" for r in errs]
    return lines


def summarise(rows: list[dict], wall_s: float | None, mode: str, csv_name: str = "zoo.csv") -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    fams = sorted({r["family"] for r in rows})
    fam_ok = sorted({r["family"] for r in ok})
    checked = [r for r in ok if r.get("concrete") == "ran"]
    agree = [r for r in checked if r.get("agrees") == "True"]
    an_times = [_f(r["analysis_s"]) for r in ok if _f(r.get("analysis_s")) is not None]
    lines = [f"<!-- wall_s={wall_s or 0:.1f} -->", f"# mixfx zoo results ({mode})", "",
             "Generated by `bench/zoo.py` (timm 1.0.31, torch 2.14.1 CPU, random weights, nothing downloaded). "
             f"Raw rows: [`{csv_name}`]({csv_name}). Concrete confirmation = real CPU forwards at the default size and two "
             "other sizes with H != W (H-32 x W-64, the size `mixfx.rewrite` verifies at, and ~0.75H x 1.125W, each "
             "rounded to a multiple of 32, else 64, else 128, else the size mixfx probed on meta tensors: the first "
             "that runs; the original's outputs there are shared with the rewrites' verification); a `fixed` "
             "verdict must fail at one of them, "
             "`convolutional`/`polymorphic` must run at both.", ""]
    lines += ["## Overall", "", "| metric | value | target |", "|---|---|---|"]
    lines.append(f"| models | {len(rows)} ({len(fams)} families) | |")
    lines.append(f"| trace + analysis succeeded (models) | {_pct(len(ok), len(rows))} | |")
    lines.append(f"| trace + analysis succeeded (families, every model OK) | "
                 f"{_pct(sum(all(r['status'] == 'ok' for r in rows if r['family'] == f) for f in fams), len(fams))} | >= 97% |")
    lines.append(f"| verdict agrees with concrete multi-size forward | {_pct(len(agree), len(checked))} | >= 98% |")
    skipped_c = [r for r in ok if str(r.get("concrete", "")).startswith("skipped")]
    failed_c = [r for r in ok if r.get("concrete") == "default size failed"]
    lines.append(f"| concrete check skipped (too large) / default size failed eagerly | {len(skipped_c)} / {len(failed_c)} | |")
    for key, label in (("conv", "--to conv"), ("linear", "--to linear")):
        tried = [r for r in ok if r.get(f"{key}_status") and not r[f"{key}_status"].startswith("skipped")]
        ver = [r for r in tried if r[f"{key}_status"] == "verified"]
        silent = [r for r in tried if r[f"{key}_status"] == "MISMATCH"]
        vf = [r for r in tried if r[f"{key}_status"] == "verify_failed"]
        err = [r for r in tried if r[f"{key}_status"] == "error"]
        weak = [r for r in tried if r[f"{key}_status"] == "degenerate"]
        lines.append(f"| {label}: verified-equivalent / zero outputs, unverifiable / caught mismatch (VerificationError) / "
                     f"pass error / silent mismatch | {len(ver)} / {len(weak)} / {len(vf)} / {len(err)} / {len(silent)} "
                     f"of {len(tried)} | zero silent |")
    with_lin = [r for r in ok if (r.get("conv_linear_before") or "0") not in ("", "0")
                and r.get("conv_status") == "verified"]
    full = [r for r in with_lin if r.get("conv_linear_after") == "0"]
    lines.append(f"| --to conv rewrites every nn.Linear (families with a Linear, verified) | {_pct(len(full), len(with_lin))} | >= 90% |")
    if an_times:
        lines.append(f"| analysis time per model: median / p90 / max | {statistics.median(an_times):.2f} s / "
                     f"{quantile(an_times, 0.9):.2f} s / {max(an_times):.2f} s | median < 0.5 s |")
    for key, label in (("trace_s", "trace"), ("symbolic_s", "symbolic run")):
        vals = [_f(r.get(key)) for r in ok if _f(r.get(key)) is not None]
        if vals:
            lines.append(f"| {label} time per model: median / p90 | {statistics.median(vals):.2f} s / "
                         f"{quantile(vals, 0.9):.2f} s | |")
    stopped = [r for r in ok if r.get("symbolic_stopped")]
    if any("trace_s" in r for r in rows):
        by_budget = sum((r.get("symbolic_stopped") or "").startswith("budget") for r in stopped)
        lines.append(f"| symbolic run stopped early, by its budget / by a failure (rest judged concretely) | "
                     f"{by_budget} / {len(stopped) - by_budget} | |")
    tot = [_f(r.get("total_s")) for r in rows if _f(r.get("total_s")) is not None]
    if tot:
        lines.append(f"| all steps per model: median / p90 | {statistics.median(tot):.1f} s / {quantile(tot, 0.9):.1f} s | |")
    if wall_s is not None:
        lines.append(f"| wall time of this run | {wall_s:.0f} s | sample < 300 s, all < 1800 s |")
    lines.append("")
    classes: dict[str, int] = {}
    for r in ok:
        classes[r["classification"]] = classes.get(r["classification"], 0) + 1
    lines.append("Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())) + ".")
    tracers: dict[str, int] = {}
    for r in ok:
        tracers[r["tracer"]] = tracers.get(r["tracer"], 0) + 1
    lines.append("Tracer that succeeded: " + ", ".join(f"{k} {v}" for k, v in sorted(tracers.items())) + ".")
    lines.append("")

    bad = [r for r in rows if r["status"] != "ok"]
    lines += ["## Analysis failures", ""]
    if bad:
        lines += ["| model | family | stage | error |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['family']} | {r.get('error_stage', '')} | {(r.get('error') or '')[:200].replace('|', '/')} |"
                  for r in bad]
    else:
        lines.append("None.")
    lines += ["", "## Disagreements with the concrete check", ""]
    dis = [r for r in checked if r.get("agrees") != "True"]
    if dis:
        lines += ["| model | mixfx verdict | rigid | concrete runs |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['classification']} | {(r.get('rigid') or '')[:150].replace('|', '/')} | "
                  f"{(r.get('concrete_runs') or '')[:220].replace('|', '/')} |" for r in dis]
    else:
        lines.append("None.")
    lines += _oracle_section(ok)
    lines += ["", "## Rewrite problems", ""]
    probs = [r for r in ok for k in ("conv", "linear") if r.get(f"{k}_status") in ("MISMATCH", "verify_failed", "error")]
    seen = set()
    rows_p = []
    for r in probs:
        for k in ("conv", "linear"):
            if r.get(f"{k}_status") in ("MISMATCH", "verify_failed", "error") and (r["name"], k) not in seen:
                seen.add((r["name"], k))
                rows_p.append(f"| {r['name']} | --to {k} | {r[f'{k}_status']} | {(r.get(f'{k}_error') or '')[:200].replace('|', '/')} |")
    if rows_p:
        lines += ["| model | rewrite | status | error |", "|---|---|---|---|"] + rows_p
    else:
        lines.append("None.")

    lines += ["", "## Per family", "",
              "| family | model | params (M) | tracer | verdict | rigid (first) | head | agrees | size search | probe | --to conv | --to linear | analysis s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["name"])):
        rigid_first = (r.get("rigid") or "").split(";")[0].replace("|", " ")
        def rw(k):
            s = r.get(f"{k}_status") or ""
            if s == "verified":
                return f"ok ({r.get(f'{k}_changes')} chg)"
            return s.replace("skipped ", "skip ")[:24]
        lines.append(f"| {r['family']} | {r['name']} | {r.get('params_m', '')} | {r.get('tracer', '')} | "
                     f"{r.get('classification') or r['status']} | {rigid_first[:60]} | {(r.get('head') or '').replace('|', ' ')[:40]} | "
                     f"{r.get('agrees', '')} | {_search_cell(r)} | {_probe_cell(r)} | {rw('conv')} | {rw('linear')} | "
                     f"{r.get('analysis_s', '')} |")
    return "\n".join(lines) + "\n"


def _search_cell(r: dict) -> str:
    f = r.get("oracle_fixed")
    if f not in ("True", "False"):
        return f or ""
    mark = "" if r.get("fixed_agrees") == "True" else " **x**"
    return ("fixed" if f == "True" else "not fixed") + mark


def _probe_cell(r: dict) -> str:
    p = r.get("probe") or ""
    if p in ("global", "local"):
        return p + ("" if r.get("locality_agrees") == "True" else " **x**")
    return p.replace("skipped ", "skip ")[:24]


def _warm_up() -> None:
    """Import mixfx and analyse a few small models once in the parent, so that every forked child
    starts warm (imports, sympy caches, torch's lazily built op tables), as a library user's
    second call does. Meta device only: no compute threads are started before the fork."""
    import timm
    import torch
    from torch import nn

    import mixfx
    import oracles  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode  # noqa: F401

    with torch.device("meta"):
        models = [nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                nn.Linear(8, 4)),
                  timm.create_model("resnet18"),
                  timm.create_model("vit_tiny_patch16_224", depth=1),
                  timm.create_model("convnext_atto", depths=(1, 1, 1, 1))]
    for m in models:
        mixfx.analyze(m, torch.empty(1, 3, 224, 224, device="meta"))


def _prev_wall(md: Path) -> float | None:
    """The wall time recorded by the previous (resumed) runs, kept in the markdown's first line."""
    if not md.exists():
        return None
    m = re.search(r"<!-- wall_s=([0-9.]+) -->", md.read_text())
    return float(m.group(1)) if m else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--family-sample", action="store_true", help="the smallest model of every timm family (default)")
    g.add_argument("--all", action="store_true", help="every architecture in timm's registry")
    g.add_argument("--models", help="comma-separated timm names")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    ap.add_argument("--forward-limit", type=float, default=60e6, help="parameters above which no real forward runs")
    ap.add_argument("--rewrite-limit", type=float, default=30e6, help="parameters above which no rewrite runs")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default bench/results/zoo.csv)")
    ap.add_argument("--summary", type=Path, default=None, help="markdown path (default bench/results/zoo_summary.md)")
    ap.add_argument("--fresh", action="store_true", help="start a new CSV instead of resuming")
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="only the first N tasks (smoke test)")
    ap.add_argument("--no-oracles", action="store_true", help="skip the size search and the perturbation probe")
    ap.add_argument("--oracle-time", type=float, default=10.0, help="seconds for the size search's meta sweep")
    ap.add_argument("--probe-flops", type=float, default=4e9,
                    help="FLOPs of one probe forward (the widest input within it is probed)")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or CSV_PATH
    md = args.summary or MD_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = "--all" if args.all else ("--models" if args.models else "--family-sample")
    if args.summary_only:
        wall = _prev_wall(md)
        md.write_text(summarise(_read_csv(out), wall, mode, out.name))
        print(f"wrote {md}")
        return 0
    if args.fresh and out.exists():
        out.unlink()
    head = _header(out)
    if head is not None and head != FIELDS:
        print(f"{out} was written by an older zoo.py (other columns): resuming would misalign its rows. "
              f"Run with --fresh, or move it away.", file=sys.stderr)
        return 2
    fams = families()
    if args.models:
        fam_of = {n: f for f, ns in fams.items() for n in ns}
        tasks = [(n, fam_of.get(n, "?"), []) for n in args.models.split(",") if n]
    elif args.all:
        tasks = [(n, f, []) for f, ns in sorted(fams.items()) for n in ns]
    else:
        tasks = [(family_candidates(ns)[0], f, family_candidates(ns)) for f, ns in sorted(fams.items())]
    done = _read_csv(out)
    done_keys = {r["family"] for r in done} if mode == "--family-sample" else {r["name"] for r in done}
    todo = [t for t in tasks if (t[1] if mode == "--family-sample" else t[0]) not in done_keys]
    if args.limit:
        todo = todo[: args.limit]
    print(f"{len(tasks)} tasks, {len(tasks) - len(todo)} already in {out}, {len(todo)} to run with --jobs {args.jobs}")
    _warm_up()
    opts = {"forward_limit": args.forward_limit, "rewrite_limit": args.rewrite_limit, "debug": args.debug,
            "oracles": not args.no_oracles, "oracle_time": args.oracle_time, "probe_flops": args.probe_flops}
    t0 = time.perf_counter()
    run_all(todo, args.jobs, args.timeout, opts, out)
    wall = time.perf_counter() - t0
    total_wall = wall + (0.0 if args.fresh else (_prev_wall(md) or 0.0))
    rows = _read_csv(out)
    md.write_text(summarise(rows, total_wall, mode, out.name))
    print(f"{len(todo)} models in {wall:.0f} s; wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
