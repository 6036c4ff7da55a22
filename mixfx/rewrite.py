"""`mixfx.rewrite`: trace, run the rewrite passes, check the result, analyse before and after.

The original model is never modified: the traced GraphModule is deep-copied before any pass runs.
Verification always runs (see `mixfx.verify` for the tolerance); when the rewritten module is not
equivalent, `VerificationError` (exit code 4) is raised and nothing is returned to be saved.
Where the model accepts more than one input size (the analyser says `convolutional` or
`polymorphic`, or the original simply runs there), it is also verified at a second size.
`--to fcn` changes the output from [N, K] to [N, K, h, w], so it has its own verification
(`verify_fcn`, at the end of this module).
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from mixfx import progress
from mixfx.errors import EXIT_VERIFY, MixfxError, UsageError, VerificationError
from mixfx.verify import DEFAULT_ATOL, DEFAULT_RTOL, SizeCheck, Verification, random_input, verify
from passes import Change, RewritePass, RewritePassResult, Skip, passes_for
from passes.modules import ChannelLayerNorm, channel_layer_norm
from passes._fxutil import annotate_example_inputs, clear_example_inputs, permutation_of, propagate_shapes

TARGETS = ("conv", "linear", "fcn", "polymorphic")


class PassError(MixfxError):
    """A rewrite pass raised: nothing was rewritten or written."""

    exit_code = EXIT_VERIFY
    kind = "rewrite"


@dataclass
class RewriteResult:
    module: GraphModule
    target: str
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verification: Verification | None = None
    classification_before: str | None = None
    classification_after: str | None = None
    passes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    rigid_before: list[str] = field(default_factory=list)
    rigid_after: list[str] = field(default_factory=list)
    score_map: Any = None  # --to fcn: passes.fcn.ScoreMap (stride, offset, output formula)
    constraints: list[str] = field(default_factory=list)  # --to polymorphic: what the cured model requires

    def to_dict(self) -> dict:
        extra = {"score_map": self.score_map.to_dict()} if self.score_map is not None else {}
        if self.constraints:
            extra["constraints"] = list(self.constraints)
        return {
            "target": self.target,
            "passes": list(self.passes),
            "changes": [c.to_dict() for c in self.changes],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
            "verification": self.verification.to_dict() if self.verification else None,
            "classification_before": self.classification_before,
            "classification_after": self.classification_after,
            "rigid_before": list(self.rigid_before),
            "rigid_after": list(self.rigid_after),
            "module_counts": module_counts(self.module),
            "timings": dict(self.timings),
        } | extra


def module_counts(module: nn.Module) -> dict[str, int]:
    """How many Linear / Conv1d / Conv2d modules the graph calls (a quick before/after view)."""
    counts: dict[str, int] = {}
    if isinstance(module, GraphModule):
        for node in module.graph.nodes:
            if node.op == "call_module":
                name = type(module.get_submodule(node.target)).__name__
                counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def count_permutes(gm: GraphModule, example_input: torch.Tensor | None = None) -> int:
    """Number of permute/transpose nodes (needs shapes, hence an example input for a bare graph)."""
    shapes = propagate_shapes(gm, None if example_input is None else [example_input])
    return sum(1 for n in gm.graph.nodes if permutation_of(n, shapes) is not None)


def default_passes(to: str, only: str | None = None) -> list[RewritePass]:
    """`passes.passes_for(to, only)`; without the patchify passes while those are not installed."""
    try:
        return passes_for(to, only)
    except ModuleNotFoundError as exc:
        if "patchify" not in (exc.name or ""):
            raise
    import fnmatch

    from passes import PASS_GROUPS
    from passes.conv_to_linear import ConvToLinear
    from passes.layout import LayoutCleanup
    from passes.linear_to_conv import LinearToConv

    selected = [LinearToConv() if to == "conv" else ConvToLinear(), LayoutCleanup()]
    if only is None:
        return selected
    names = {m for g, ms in PASS_GROUPS.items() if fnmatch.fnmatch(g, only) for m in ms}
    keep = [p for p in selected if p.name in names or fnmatch.fnmatch(p.name, only)]
    if keep and keep[-1].name != "layout":
        keep.append(selected[-1])
    return keep


def run_pipeline(gm: GraphModule, pipeline: Sequence[RewritePass], example_input: torch.Tensor,
                 model_name: str) -> tuple[GraphModule, list[Change], list[Skip], list[str]]:
    """Run the passes in order on `gm` (annotated with the example's shapes while they run) and
    collect what they changed, skipped and noted. A pass that raises anything but a MixfxError
    becomes a PassError: nothing was rewritten."""
    annotate_example_inputs(gm, example_input)
    changes: list[Change] = []
    skipped: list[Skip] = []
    notes: list[str] = []
    for p in pipeline:
        name = getattr(p, "name", type(p).__name__)
        progress.stage(f"rewrite pass {name}")
        try:
            result = p(gm)
        except MixfxError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing pass is reported, the original is untouched
            raise PassError(
                f"the rewrite pass `{name}` failed on {model_name}: {type(exc).__name__}: {exc}. Nothing was "
                "rewritten.", "Run with --debug for the traceback; --only PATTERN runs a subset of the passes.") from exc
        if result is not None:
            gm = result.graph_module
            if isinstance(result, RewritePassResult):
                changes += result.changes
                skipped += result.skipped
                notes += result.notes
    clear_example_inputs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm, changes, skipped, notes


def _trace(model: nn.Module, leaves: Sequence, example_input: torch.Tensor) -> GraphModule:
    if isinstance(model, GraphModule):
        return copy.deepcopy(model)
    from mixfx.tracing import trace

    # mixfx's own channel LayerNorm stays one node, so a rewritten model can be rewritten back.
    # fx only (the passes need module-level Linear/Conv nodes), checked against the eager model,
    # retraced with optional `mask=None`-style arguments fixed where the first graph is wrong.
    traced = trace(model, example_input, leaves=tuple(leaves) + (ChannelLayerNorm,),
                   autowrap=(channel_layer_norm,), allow_export=False)
    return copy.deepcopy(traced.graph_module)


def _analyse(module: nn.Module, example_input: torch.Tensor, leaves: Sequence) -> Any:
    try:
        from mixfx.analysis import analyze
    except ImportError:  # pragma: no cover
        return None
    kwargs = {"leaves": leaves} if leaves and not isinstance(module, GraphModule) else {}
    return analyze(module, example_input, **kwargs)


def _rigid(report: Any) -> list[str]:
    if report is None:
        return []
    return [getattr(r, "module", None) or getattr(r, "node", "?") for r in getattr(report, "rigid_nodes", [])]


def second_sizes(example_input: torch.Tensor) -> list[tuple[int, ...]]:
    """Candidate second input sizes, in order of preference: the spatial dims shrunk by different
    multiples of 32 (224x224 -> 192x160, 0.6x the compute of the example; never H == W), then grown
    by them (for inputs too small to shrink, or models with a minimum size), then doubled."""
    shape = tuple(example_input.shape)
    if len(shape) < 3:
        return []
    spatial = shape[2:]

    def moved(sign: int) -> tuple[int, ...]:
        deltas = [32 * (i + 1) for i in range(len(spatial))]
        out = tuple(s + sign * d for s, d in zip(spatial, deltas))
        if len(out) > 1 and len(set(out)) == 1:  # 96x128 -> 64x64: take the deltas the other way
            out = tuple(s + sign * d for s, d in zip(spatial, reversed(deltas)))
        return shape[:2] + out

    shrunk, grown, doubled = moved(-1), moved(1), shape[:2] + tuple(2 * s for s in spatial)
    if all(n >= max(s - n, s // 2) for s, n in zip(spatial, shrunk[2:])):
        return [shrunk, grown, doubled]
    return [grown, doubled]


def rewrite(
    model: nn.Module,
    to: str = "conv",
    example_input: torch.Tensor | None = None,
    passes: Sequence[RewritePass] | None = None,
    *,
    only: str | None = None,
    input_shape: Sequence[int] | None = None,
    verify_sizes: Sequence[Sequence[int]] | None = None,
    leaves: Sequence = (),
    analyze: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    reference_outputs: dict | None = None,
) -> RewriteResult:
    """Rewrite `model` towards `to` ("conv": Linear -> 1x1 conv; "linear": 1x1 conv -> Linear;
    "fcn": the classifier's head -> convolutions, output [N, K, h, w]; always analysed first;
    "polymorphic": cure what pins the input size, see `rewrite_polymorphic`).

    `passes` overrides the default pipeline (`passes.passes_for(to, only)`). `verify_sizes` gives
    the extra input shapes to verify at (default: a second size when the model takes one).
    `analyze=False` skips the before/after classification (faster). `reference_outputs`: one
    dict shared by several rewrites of the same unchanged model (`--to conv` and `--to linear`)
    runs the original once per verification input (see `mixfx.verify.verify`). Raises `VerificationError`
    when the result is not equivalent and `PassError` when a pass fails."""
    if to not in TARGETS:
        raise UsageError(f"unknown rewrite target {to!r}.", f"Use --to with one of: {', '.join(TARGETS)}.")
    if example_input is None:
        example_input = random_input(tuple(input_shape) if input_shape else (1, 3, 224, 224))
    if to == "polymorphic":
        return rewrite_polymorphic(model, example_input, passes, verify_sizes=verify_sizes, leaves=leaves)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        progress.stage("analysing the original")
        report_before = _analyse(model, example_input, leaves) if analyze or to == "fcn" else None
        timings["analyse_before_s"] = time.perf_counter() - t_start

        t0 = time.perf_counter()
        gm = _trace(model, leaves, example_input)
        timings["trace_s"] = time.perf_counter() - t0
        pipeline = list(passes) if passes is not None else default_passes(to, only)
        for p in pipeline:  # --to fcn refuses what the analysis calls not convolutional
            if hasattr(p, "report") and getattr(p, "report", None) is None:
                p.report = report_before
        t0 = time.perf_counter()
        gm, changes, skipped, notes = run_pipeline(gm, pipeline, example_input, type(model).__name__)
        timings["passes_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        plan = next((p.plan for p in pipeline if getattr(p, "plan", None) is not None), None)
        if plan is not None:
            verification, fcn_notes = verify_fcn(model, gm, example_input, plan, rtol=rtol)
            notes += fcn_notes
        elif verify_sizes is None:
            classification = getattr(report_before, "classification", None)
            candidates = [] if classification == "fixed" else second_sizes(example_input)[:2]
            extra = next(([s] for s in candidates if _runs(model, example_input, s)), [])
        else:
            extra = [tuple(s) for s in verify_sizes]
        if plan is None:
            verification = verify(model, gm, example_input, extra_sizes=extra, atol=atol, rtol=rtol,
                                  reference_outputs=reference_outputs)
        timings["verify_s"] = time.perf_counter() - t0
        if verification.float64_sizes:
            notes.append("verification: " + verification.summary().split("; ", 1)[-1]
                         + " (float32 rounding in this network exceeds the float32 tolerance on its own)")
        if verification.randomised:
            notes.append(f"verification: the original's outputs are identically zero on random inputs (zero-initialised "
                         f"parameters), so it compared copies with those {len(verification.randomised)} parameter(s) "
                         "drawn at random, the same values in both")

        t0 = time.perf_counter()
        report_after = None
        if analyze and verification.passed:
            progress.stage("analysing the rewritten model")
            report_after = _analyse(gm, example_input, ())
        timings["analyse_after_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    timings["total_s"] = time.perf_counter() - t_start
    out = RewriteResult(
        module=gm, target=to, changes=changes, skipped=skipped, notes=notes, verification=verification,
        classification_before=getattr(report_before, "classification", None),
        classification_after=getattr(report_after, "classification", None),
        passes=[getattr(p, "name", type(p).__name__) for p in pipeline], timings=timings,
        rigid_before=_rigid(report_before), rigid_after=_rigid(report_after),
        score_map=getattr(plan, "score_map", None))
    if not verification.passed:
        bad = next((s for s in verification.sizes if not s.passed), None)
        where = ""
        if bad is not None:
            where = f" at input {'x'.join(map(str, bad.input_shape))}"
            where += f": {bad.error}" if bad.error else (
                f": max abs err {bad.max_abs_err:.3g} > {verification.tolerance['atol']:g} + "
                f"{verification.tolerance['rtol']:g} * {bad.ref_scale:.3g}")
        what = (f"could not be proven equivalent to the original: {verification.unproven}" if verification.unproven
                else f"is not equivalent to the original{where}")
        hint = ("Load trained weights (or any whose outputs are not all zero) into the model and rewrite that."
                if verification.unproven else
                "Run with --only to narrow down which pass is responsible, and report the model if it is a mixfx bug.")
        exc = VerificationError(f"the rewritten {type(model).__name__} {what}. Nothing was written.", hint)
        exc.result = out  # type: ignore[attr-defined]
        raise exc
    return out


def _runs(model: nn.Module, example_input: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether the original model accepts `shape`: checked on meta tensors (no compute), or by a
    real forward where the model cannot run on meta tensors (data-dependent sizes, ops without a
    meta kernel)."""
    from mixfx.shapes import classify_exception, eager_meta_forward

    try:
        eager_meta_forward(model, shape, example_input.dtype)
        return True
    except Exception as exc:  # noqa: BLE001
        if classify_exception(exc) not in ("data_dependent", "unsupported"):
            return False
    try:
        with torch.no_grad():
            model(random_input(tuple(shape)).to(example_input.dtype))
        return True
    except Exception:  # noqa: BLE001
        return False


# --- --to fcn: the output changes from [N, K] to [N, K, h, w] -----------------------------------

FCN_RTOL = 1e-5  # relative to the output's scale, as everywhere in mixfx.verify
FCN_MAX_POSITIONS = 16  # map positions compared per size (corners and edges first)


class _MapAt00(nn.Module):
    """The converted model's map at position (0, 0): `[N, K]`, the original's output shape."""

    def __init__(self, fcn: nn.Module):
        super().__init__()
        self.fcn = fcn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fcn(x)[:, :, 0, 0]


def verify_fcn(model: nn.Module, gm: GraphModule, example_input: torch.Tensor, plan: Any,
               rtol: float = DEFAULT_RTOL) -> tuple[Verification, list[str]]:
    """Checks of `--to fcn` (`plan`: `passes.fcn.FcnPlan`):

    1. at the example size the map is 1x1 and equals the original's output (<= 1e-5 relative);
    2. at two larger sizes it runs, has the size the score map's formula gives, and each map
       position equals the original head run on its window of the feature map (computed by
       the unchanged spatial part): the head rewrite is exact at every position, padding or not;
    3. where the network is padding-free, map positions equal the original model run on the
       matching input crop (reported in the notes; with padding the notes say how far they are
       off and why)."""
    tol = min(rtol, FCN_RTOL)
    at00 = _MapAt00(gm).train(gm.training)  # verify restores this mode on the shared gm afterwards
    first = verify(model, at00, example_input, atol=0.0, rtol=tol)
    gm.eval()
    plan.head.eval()
    with torch.no_grad():
        size = tuple(gm(example_input).shape[2:])
    if size != (1, 1):
        first.passed = False
        first.sizes[0].passed = False
        first.sizes[0].error = f"the map is {size[0]}x{size[1]} at the example size, not 1x1"
    sizes = _larger_sizes(gm, plan, example_input)
    checks = [_windows_check(gm, plan, s, example_input, tol) for s in sizes]
    all_checks = first.sizes + checks
    compared = [c for c in all_checks if c.error is None]
    verification = Verification(
        first.passed and all(c.passed for c in checks),
        max((c.max_abs_err for c in all_checks), default=0.0), max((c.max_rel_err for c in all_checks), default=0.0),
        {"atol": 0.0, "rtol": tol}, all_checks, first.seed, first.float64_sizes)
    notes = [f"verification: at {_fmt(example_input.shape)} the 1x1 map equals the original's output; at "
             + " and ".join(_fmt(s) for s in sizes) + " every map position checked equals the original head on its "
             f"{plan.window[0]}x{plan.window[1]} window of `{plan.feature_map}` (stepping {plan.head_stride[0]}x"
             f"{plan.head_stride[1]})"]
    if verification.passed and compared:
        notes += _crop_notes(model, gm, plan, sizes[0], example_input)
    return verification, notes


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _stride_guess(example_input: torch.Tensor, plan: Any) -> tuple[int, int]:
    """Where the geometry is unknown: input size over feature-map size, times the head's stride."""
    h, w = example_input.shape[2:]
    return (max(1, h // plan.window[0]) * plan.head_stride[0], max(1, w // plan.window[1]) * plan.head_stride[1])


def _larger_sizes(gm: GraphModule, plan: Any, example_input: torch.Tensor) -> list[tuple[int, ...]]:
    """Two larger input shapes (H != W) the spatial part accepts: the example grown by multiples
    of the map's stride, the smallest two per axis that run on meta tensors up to the feature
    map, so that a divisibility constraint ((H//4) % 7 == 0) is met. A failure after the feature
    map is the head's, and left for the check to report."""
    from mixfx.shapes import propagate_concrete
    from passes._fxutil import ancestors

    n, c, h, w = example_input.shape
    sy, sx = plan.score_map.stride or _stride_guess(example_input, plan)
    feature = next(node for node in gm.graph.nodes if node.name == plan.feature_map)
    body = {a.name for a in ancestors([feature])}

    def accepted(hh: int, ww: int) -> bool:
        failure = propagate_concrete(gm, (n, c, hh, ww), allow_real=False).failure
        return failure is None or failure.node not in body or failure.kind in ("data_dependent", "unsupported")

    def steps(stride: int, grow) -> list[int]:
        found: list[int] = []
        for k in range(1, 17):
            if accepted(*grow(k * stride)):
                found.append(k * stride)
                if len(found) == 2:
                    return found
        return [stride, 2 * stride]  # none found: the checks say where it fails

    dh = steps(sy, lambda d: (h + d, w))
    dw = steps(sx, lambda d: (h, w + d))
    return [(n, c, h + dh[0], w + dw[1]), (n, c, h + dh[1], w + dw[0])]


def _run_keeping(gm: GraphModule, node_name: str, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(value of node `node_name`, output) of one run of `gm`."""
    kept: dict[str, Any] = {}

    class _Keep(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == node_name:
                kept["v"] = out
            return out

    with torch.no_grad():
        out = _Keep(gm).run(x)
    return kept["v"], out


def _positions(h: int, w: int) -> list[tuple[int, int]]:
    every = [(i, j) for i in range(h) for j in range(w)]
    if len(every) <= FCN_MAX_POSITIONS:
        return every
    edges = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w // 2), (h // 2, 0)]
    gen = torch.Generator().manual_seed(0)
    rest = [every[int(k)] for k in torch.randperm(len(every), generator=gen)[:FCN_MAX_POSITIONS - len(edges)]]
    return list(dict.fromkeys(edges + rest))


def _windows_check(gm: GraphModule, plan: Any, shape: Sequence[int], like: torch.Tensor, tol: float) -> SizeCheck:
    shape = tuple(shape)
    x = random_input(shape, like)
    try:
        features, out = _run_keeping(gm, plan.feature_map, x)
    except Exception as exc:  # noqa: BLE001
        return SizeCheck(shape, float("inf"), float("inf"), 0.0, False,
                         f"the converted model fails: {type(exc).__name__}: {exc}")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return SizeCheck(shape, float("inf"), float("inf"), 0.0, False, "the output is not a [N, K, h, w] map")
    expected = plan.score_map.output_shape
    if expected:
        want = tuple(eval(e, {}, {"H": shape[2], "W": shape[3]}) for e in expected[2:])  # noqa: S307 - our formula
        if tuple(out.shape[2:]) != want:
            return SizeCheck(shape, float("inf"), float("inf"), 0.0, False,
                             f"the map is {out.shape[2]}x{out.shape[3]}, the formula says {want[0]}x{want[1]}")
    max_abs, scale = 0.0, 0.0
    try:
        with torch.no_grad():
            for i, j in _positions(out.shape[2], out.shape[3]):
                ref = plan.head(plan.window_of(features, i, j)).double()
                got = out[:, :, i, j].double()
                max_abs = max(max_abs, float((ref - got).abs().max()))
                scale = max(scale, float(ref.abs().max()))
    except Exception as exc:  # noqa: BLE001
        return SizeCheck(shape, float("inf"), float("inf"), 0.0, False,
                         f"the original head fails on a window: {type(exc).__name__}: {exc}")
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return SizeCheck(shape, max_abs, rel, scale, max_abs <= tol * scale)


def _crop_notes(model: nn.Module, gm: GraphModule, plan: Any, shape: Sequence[int], like: torch.Tensor) -> list[str]:
    """Map positions against the original run on the matching crop: equal for a padding-free
    network; with padding (or global context) say how far off and why."""
    sm = plan.score_map
    if sm.stride is None:
        return [f"the score map's geometry is unknown (at `{sm.unknown_at}`): positions were not compared "
                "with crops"]
    x = random_input(tuple(shape), like)
    h, w = like.shape[2:]
    (sy, sx), (oy, ox) = sm.stride, sm.offset
    with torch.no_grad():
        out = gm(x)
        spots = _positions(out.shape[2], out.shape[3])
        if not sm.padding_free:
            spots = spots[:2]
        max_abs, scale = 0.0, 0.0
        for i, j in spots:
            top, left = i * sy + max(oy, 0), j * sx + max(ox, 0)
            ref = model(x[..., top:top + h, left:left + w]).double()
            max_abs = max(max_abs, float((ref - out[:, :, i, j].double()).abs().max()))
            scale = max(scale, float(ref.abs().max()))
    rel = max_abs / scale if scale > 0 else 0.0
    where = f"{len(spots)} positions at {_fmt(shape)}, crop x[..., {sy}i:{sy}i+{h}, {sx}j:{sx}j+{w}]"
    if sm.padding_free:
        verdict = "equals" if rel <= FCN_RTOL else f"DIFFERS from (max rel err {rel:.3g})"
        return [f"padding-free: each map position {verdict} the original run on its crop ({where}; max rel err "
                f"{rel:.3g})"]
    why = []
    if sm.padded_at:
        why.append(f"the network pads ({', '.join(f'`{n}`' for n in sm.padded_at[:3])}"
                   + (f" and {len(sm.padded_at) - 3} more" if len(sm.padded_at) > 3 else "")
                   + "): a crop run pads the crop's own borders with zeros where the larger input has real pixels, "
                   "so every position whose receptive field reaches a crop border differs (here the receptive field "
                   f"is {sm.receptive_field[0]}x{sm.receptive_field[1]}, the crop {h}x{w})")
    if sm.global_context:
        why.append(f"global context ({', '.join(f'`{n}`' for n in sm.global_context[:3])}) pools over the whole "
                   "input, not the crop")
    return ["map positions are the dense evaluation, not crop runs: " + "; ".join(why)
            + f" (measured at {where}: max rel err {rel:.3g})"]


# --- `--to polymorphic`: a cure changes the accepted sizes, so it is verified differently ----------

POLYMORPHIC_RTOL = 1e-6  # at the example size the cured graph must equal the original (relative)


def rewrite_polymorphic(
    model: nn.Module,
    example_input: torch.Tensor,
    passes: Sequence[RewritePass] | None = None,
    *,
    verify_sizes: Sequence[Sequence[int]] | None = None,
    leaves: Sequence = (),
    min_other_sizes: int = 2,
    report_before: Any = None,
) -> RewriteResult:
    """Cure the rigid nodes of a `fixed` model (`passes.cure.Cure`) and verify the cure.

    A `fixed` original runs at its example size only, so `verify` (which compares at sizes where
    the original runs) cannot check the rest. The cure is accepted when (1) the cured graph equals
    the original at the example size (max abs err <= 1e-6 * max|ref|), (2) it runs, with finite
    outputs of the example's structure, at `min_other_sizes` other sizes (`verify_sizes`, or the
    first that run among `second_sizes` and the cure's probe size), and (3) the re-analysis of the
    cured graph is not `fixed`. Raises `passes.cure.CureRefused` (exit 4) where a rigid node has
    no cure and `VerificationError` (exit 4) where a check fails; nothing is returned then.
    `report_before`: the model's analysis when the caller already has it."""
    from passes.cure import Cure
    from passes._cure_probe import probe_shape
    from passes._cure_square import square_constraint, square_sizes

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if report_before is None:
            report_before = _analyse(model, example_input, leaves)
        timings["analyse_before_s"] = time.perf_counter() - t_start
        t0 = time.perf_counter()
        gm = _trace(model, leaves, example_input)
        timings["trace_s"] = time.perf_counter() - t0
        notes: list[str] = []
        before = getattr(report_before, "classification", None)
        rigid = list(getattr(report_before, "rigid_nodes", []))
        if passes is not None:
            pipeline = list(passes)
        elif before == "fixed":
            pipeline = [Cure(rigid, model_name=type(model).__name__)]
        else:
            pipeline = []
            notes.append(f"the model is already {before}: nothing to cure")
        t0 = time.perf_counter()
        # CureRefused (a MixfxError) propagates: nothing was written
        gm, changes, _, pass_notes = run_pipeline(gm, pipeline, example_input, type(model).__name__)
        notes += pass_notes
        timings["passes_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        at_example = verify(model, gm, example_input, atol=0.0, rtol=POLYMORPHIC_RTOL)
        # what the cure found the cured graph requires (`H == W`): the other sizes must meet it
        required = list(dict.fromkeys(c for p in pipeline for c in getattr(p, "constraints", [])))
        square = square_constraint(example_input.shape) in required
        candidates = ([tuple(s) for s in verify_sizes] if verify_sizes is not None
                      else square_sizes(example_input.shape) if square
                      else _unique(second_sizes(example_input) + [probe_shape(example_input.shape)]))
        runs = _runs_at(gm, model, example_input, candidates, min_other_sizes)
        sizes = at_example.sizes[:1] + runs
        ran = [s for s in runs if s.passed]
        verification = Verification(at_example.passed and len(ran) >= min_other_sizes, at_example.max_abs_err,
                                    at_example.max_rel_err, {"atol": 0.0, "rtol": POLYMORPHIC_RTOL}, sizes,
                                    float64_sizes=at_example.float64_sizes)
        timings["verify_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report_after = _analyse(gm, example_input, ()) if verification.passed else None
        timings["analyse_after_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    timings["total_s"] = time.perf_counter() - t_start
    after = getattr(report_after, "classification", None)
    if report_after is not None and report_after.constraints:
        notes.append("the cured model takes inputs with " + ", ".join(report_after.constraints))
    constraints = list(dict.fromkeys(required + list(getattr(report_after, "constraints", None) or [])))
    out = RewriteResult(module=gm, target="polymorphic", changes=changes, notes=notes, verification=verification,
                        classification_before=before, classification_after=after,
                        passes=[getattr(p, "name", type(p).__name__) for p in pipeline], timings=timings,
                        rigid_before=_rigid(report_before), rigid_after=_rigid(report_after),
                        constraints=constraints)
    problem = None
    if not at_example.passed:
        bad = at_example.sizes[0]
        problem = (f"differs from the original at the example size {_shape(bad.input_shape)}: "
                   + (bad.error or f"max abs err {bad.max_abs_err:.3g} > 1e-06 * {bad.ref_scale:.3g}"))
    elif len(ran) < min_other_sizes:
        tried = "; ".join(f"{_shape(s.input_shape)}: {s.error}" for s in runs if not s.passed) or "none"
        problem = f"runs at {len(ran)} other size(s), not {min_other_sizes} (tried {tried})"
    elif after == "fixed":
        problem = "is still `fixed` by the analysis: " + ", ".join(out.rigid_after)
    if problem is not None:
        exc = VerificationError(f"the cured {type(model).__name__} {problem}. Nothing was written.",
                                "Report the model if this is a mixfx bug; --debug shows the details.")
        exc.result = out  # type: ignore[attr-defined]
        raise exc
    return out


def _unique(shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for s in shapes:
        if tuple(s) not in out:
            out.append(tuple(s))
    return out


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _runs_at(gm: GraphModule, model: nn.Module, example_input: torch.Tensor,
             candidates: Sequence[tuple[int, ...]], wanted: int) -> list[SizeCheck]:
    """Real forwards of the cured graph at the candidate sizes until `wanted` of them run: a size
    passes when the outputs are finite and shaped like the example's, up to the sizes that follow
    the input (no reference exists there: the original does not run)."""
    from mixfx.verify import flatten_output

    with torch.no_grad():
        reference = flatten_output(gm(example_input))
    checks: list[SizeCheck] = []
    for shape in candidates:
        if sum(c.passed for c in checks) >= wanted:
            break
        if shape == tuple(example_input.shape):
            continue
        x = random_input(shape, example_input)
        try:  # (a failing GraphModule prints its generated code to stderr: kept out of the output)
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                out = flatten_output(gm(x))
        except Exception as exc:  # noqa: BLE001 - a size the cure does not reach is a finding
            checks.append(SizeCheck(shape, float("nan"), float("nan"), 0.0, False,
                                    f"the cured model fails: {type(exc).__name__}: {str(exc)[:200]}"))
            continue
        error = _structure_difference(reference, out, same_batch=shape[0] == example_input.shape[0])
        checks.append(SizeCheck(shape, float("nan"), float("nan"), 0.0, error is None, error))
    return checks


def _structure_difference(reference: list, out: list, same_batch: bool = False) -> str | None:
    """Why `out` (at another size) is not shaped like the example's `reference`: structure, rank,
    non-finite values, or, at the example's batch size, a batch dim that took the size change
    (a `-1` in a view that absorbed it: Hiera's unroll gave 6 images for 1 at 448x672)."""
    if [k for k, _ in reference] != [k for k, _ in out]:
        return "the output structure differs from the example's"
    for (path, r), (_, o) in zip(reference, out):
        if isinstance(r, torch.Tensor):
            if not isinstance(o, torch.Tensor) or o.dim() != r.dim():
                return f"{path}: rank differs from the example's"
            if same_batch and r.dim() > 0 and o.shape[0] != r.shape[0]:
                return (f"{path}: the batch dim is {o.shape[0]}, {r.shape[0]} at the example "
                        "(the size change went into the batch)")
            if o.is_floating_point() and not bool(torch.isfinite(o).all()):
                return f"{path}: non-finite outputs"
    return None
