"""Numeric equivalence of a rewritten model and its original.

Both models are run in eval mode, without grad, on the same random input (fixed seed) at the
example size and at every extra size, and their outputs are compared leaf by leaf (tensors inside
tuples, lists and dicts; other values must be equal).

Tolerance (float32 defaults, `DEFAULT_ATOL` / `DEFAULT_RTOL`): a size passes when
`max|out - ref| <= atol + rtol * max|ref|`. The relative part is taken against the output's scale
rather than element by element, because a rewrite changes the summation order of every dot
product (a 1x1 conv and a Linear run different kernels), and an output element that is near zero
gets a large element-wise relative error from rounding alone. `max_rel_err` is reported the same
way: `max|out - ref| / max|ref|`. Real rewrite errors (wrong weight order, wrong dim) are of the
order of the outputs themselves, far above this tolerance.

Where float32 misses the tolerance without a structural error, the comparison is repeated on
float64 copies with rtol 1e-9 (`float64_sizes`): some randomly initialised networks amplify
float32 rounding past any fixed tolerance even against themselves.

A comparison of outputs that are identically zero proves nothing (timm zero-initialises the
classifier of Mixer, ResMLP, ...: every rewrite "passes"). Then the check is made again on
copies of both models in which every all-zero parameter of the original is drawn at random, with
the same values in the rewritten copy (matched by name, the same numbers in the same flat order,
so a Linear [out, in] and its 1x1 conv [out, in, 1, 1] agree); `randomised` names them. A check
that stays degenerate, or whose zero parameters have no counterpart in the rewritten model, is
never `passed`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from mixfx import progress

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
SEED = 0


@dataclass
class SizeCheck:
    """The comparison at one input shape."""

    input_shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    ref_scale: float  # max |ref|
    passed: bool
    error: str | None = None  # why the outputs could not be compared (raise, shape mismatch)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d


@dataclass
class Verification:
    passed: bool
    max_abs_err: float
    max_rel_err: float
    tolerance: dict[str, float]
    sizes: list[SizeCheck] = field(default_factory=list)
    seed: int = SEED
    # float32 failed on rounding alone: the same comparison in float64 (see `verify`)
    float64_sizes: list[SizeCheck] = field(default_factory=list)
    # the original's outputs were identically zero: these all-zero parameters were drawn at
    # random (same values in both copies) and `sizes` are the comparison on those copies
    randomised: list[str] = field(default_factory=list)
    # why the check could not prove anything (then `passed` is False)
    unproven: str | None = None

    @property
    def degenerate(self) -> bool:
        """Every compared output is identically zero (a zero-initialised head): the comparison
        passes whatever the rewrite did, so it proves nothing."""
        compared = [s for s in self.sizes if s.error is None]
        return bool(compared) and all(s.ref_scale == 0 and s.max_abs_err == 0 for s in compared)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "degenerate": self.degenerate, "max_abs_err": self.max_abs_err,
                "max_rel_err": self.max_rel_err, "tolerance": dict(self.tolerance), "seed": self.seed,
                "sizes": [s.to_dict() for s in self.sizes],
                "float64_sizes": [s.to_dict() for s in self.float64_sizes],
                "randomised": list(self.randomised), "unproven": self.unproven}

    def summary(self) -> str:
        shapes = ", ".join("x".join(map(str, s.input_shape)) for s in self.sizes)
        verdict = "passed" if self.passed else "FAILED"
        text = (f"{verdict} at {shapes}: max abs err {self.max_abs_err:.3g}, max rel err {self.max_rel_err:.3g} "
                f"(tolerance atol={self.tolerance['atol']:g} + rtol={self.tolerance['rtol']:g} * max|ref|)")
        if self.randomised:
            text += (f"; the original's outputs are identically zero, so this comparison was made with its "
                     f"{len(self.randomised)} all-zero parameter(s) drawn at random in both models "
                     f"({', '.join(self.randomised[:3])}{', ...' if len(self.randomised) > 3 else ''})")
        if self.unproven:
            text += f"; not proven: {self.unproven}"
        if self.float64_sizes:
            rel = max(c.max_rel_err for c in self.float64_sizes)
            text += (f"; float32 missed the tolerance, so the check was repeated in float64: max rel err {rel:.3g} "
                     f"({'within' if self.passed else 'above'} {FLOAT64_RTOL:g})")
        return text


def random_input(shape: Sequence[int], like: torch.Tensor | None = None, seed: int = SEED) -> torch.Tensor:
    """A standard-normal input of `shape` (dtype/device of `like`), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(dtype)
    return x.to(like.device) if like is not None else x


def flatten_output(out: Any, prefix: str = "out") -> list[tuple[str, Any]]:
    """(path, leaf) pairs of a nested output: tensors in tuples, lists, dicts and dataclass-like objects."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        return [kv for k in sorted(out, key=str) for kv in flatten_output(out[k], f"{prefix}[{k!r}]")]
    if isinstance(out, (tuple, list)):
        return [kv for i, v in enumerate(out) for kv in flatten_output(v, f"{prefix}[{i}]")]
    return [(prefix, out)]


def compare_outputs(ref: Any, out: Any, atol: float, rtol: float) -> tuple[float, float, float, bool, str | None]:
    """(max_abs_err, max_rel_err, ref_scale, passed, error) over all leaves."""
    ref_leaves, out_leaves = flatten_output(ref), flatten_output(out)
    if [k for k, _ in ref_leaves] != [k for k, _ in out_leaves]:
        return float("inf"), float("inf"), 0.0, False, (
            f"output structure differs: {[k for k, _ in ref_leaves]} vs {[k for k, _ in out_leaves]}")
    max_abs, scale = 0.0, 0.0
    for (path, r), (_, o) in zip(ref_leaves, out_leaves):
        if isinstance(r, torch.Tensor) != isinstance(o, torch.Tensor):
            return float("inf"), float("inf"), scale, False, f"{path}: tensor vs {type(o).__name__}"
        if not isinstance(r, torch.Tensor):
            if r != o:
                return float("inf"), float("inf"), scale, False, f"{path}: {r!r} != {o!r}"
            continue
        if r.shape != o.shape:
            return float("inf"), float("inf"), scale, False, f"{path}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        r64, o64 = r.detach().double(), o.detach().double()
        if not torch.equal(torch.isfinite(r64), torch.isfinite(o64)):
            return float("inf"), float("inf"), scale, False, f"{path}: non-finite values differ"
        finite = torch.isfinite(r64)
        diff = (r64 - o64).abs()[finite]
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            scale = max(scale, float(r64.abs()[finite].max()))
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel, scale, max_abs <= atol + rtol * scale, None


def reference_output(original: nn.Module, shape: Sequence[int], reference_outputs: dict,
                     like: torch.Tensor | None = None, seed: int = SEED) -> Any:
    """The original's output at the random input `verify` uses at `shape` (`random_input(shape,
    like, seed)`), taken from `reference_outputs` or computed once and kept there; raises what
    the original raises (kept too). A caller that runs the original itself (a concrete check at
    some sizes) can go through this function and a later `verify` with the same dict reuses it."""
    return _reference_at(original, random_input(tuple(shape), like, seed), seed, reference_outputs)


def _reference_at(original: nn.Module, x: torch.Tensor, seed: int, reference_outputs: dict) -> Any:
    """`reference_output` for the input `x` already drawn with `seed`."""
    key = (tuple(x.shape), x.dtype, str(x.device), seed)
    if key not in reference_outputs:
        try:
            reference_outputs[key] = _run(original, x)
        except Exception as exc:  # noqa: BLE001 - kept, so the next caller gets the same error
            reference_outputs[key] = _OriginalFailed(exc)
    out = reference_outputs[key]
    if isinstance(out, _OriginalFailed):
        raise out.error
    return out


@dataclass(frozen=True)
class _OriginalFailed:
    """The original raised at this input (kept in `reference_outputs` like an output)."""

    error: Exception


def _run(model: nn.Module, x: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(x)


def verify(
    original: nn.Module,
    rewritten: nn.Module,
    example_input: torch.Tensor,
    *,
    extra_sizes: Sequence[Sequence[int]] = (),
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    seed: int = SEED,
    reference_outputs: dict | None = None,
    _randomise: bool = True,
) -> Verification:
    """Compare `rewritten` against `original` on random inputs shaped like `example_input` and
    like each of `extra_sizes` (full input shapes). Never raises for a mismatch: see `.passed`.

    `reference_outputs`: a dict (start it empty) that keeps the original's outputs at the inputs
    used here. Passing the same dict to several verifications of one unchanged original runs the
    original once per input instead of once per verification."""
    modes = (original.training, rewritten.training)
    original.eval()
    rewritten.eval()
    try:
        checks = _compare_at_sizes(original, rewritten, example_input, extra_sizes, seed, atol, rtol,
                                   reference_outputs=reference_outputs)
    finally:
        original.train(modes[0])
        rewritten.train(modes[1])
    compared = [c for c in checks if c.error is None or c.max_abs_err == float("inf")]
    max_abs = max((c.max_abs_err for c in compared), default=0.0)
    max_rel = max((c.max_rel_err for c in compared), default=0.0)
    passed = bool(checks) and all(c.passed for c in checks) and bool(compared)
    result = Verification(passed, max_abs, max_rel, {"atol": atol, "rtol": rtol}, checks, seed)
    if not passed and example_input.dtype == torch.float32 and all(c.error is None for c in checks):
        result.float64_sizes = _float64_checks(original, rewritten, example_input, extra_sizes, seed)
        result.passed = bool(result.float64_sizes) and all(c.passed for c in result.float64_sizes)
    if result.passed and result.degenerate and _randomise:
        return _verify_with_zero_parameters_drawn(original, rewritten, example_input, extra_sizes, atol, rtol, seed,
                                                  result)
    if result.degenerate:
        result.passed = False
        result.unproven = result.unproven or "the outputs are identically zero, so the comparison cannot detect a wrong rewrite"
    return result


def zero_parameters(model: nn.Module) -> list[str]:
    """Names of the floating parameters that are all zeros (zero-initialised heads, biases)."""
    return [n for n, p in model.named_parameters() if p.is_floating_point() and p.numel() and not bool(p.detach().any())]


def _verify_with_zero_parameters_drawn(original: nn.Module, rewritten: nn.Module, example_input: torch.Tensor,
                                       extra_sizes: Sequence[Sequence[int]], atol: float, rtol: float,
                                       seed: int, degenerate: Verification) -> Verification:
    """The original's outputs are all zeros (`degenerate`): compare copies in which the original's
    all-zero parameters hold the same random values in both models (see the module docstring)."""
    import copy

    def unproven(reason: str) -> Verification:
        degenerate.passed, degenerate.unproven = False, reason  # its all-zero rows show why
        return degenerate

    names = zero_parameters(original)
    if not names:
        return unproven("the outputs are identically zero and no parameter is all zeros: there is nothing to "
                        "draw at random for a check that could fail")
    new_params = dict(rewritten.named_parameters())
    missing = [n for n in names if n not in new_params or new_params[n].numel() != original.get_parameter(n).numel()]
    if missing:
        return unproven(f"the outputs are identically zero, and the all-zero parameter(s) {', '.join(missing[:3])} "
                        "have no counterpart of the same size in the rewritten model to draw the same values in")
    try:
        ref_model, new_model = copy.deepcopy(original), copy.deepcopy(rewritten)
    except Exception as exc:  # noqa: BLE001
        return unproven(f"the outputs are identically zero and the models cannot be copied to draw parameters "
                        f"at random ({type(exc).__name__})")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in names:
            p_ref, p_new = ref_model.get_parameter(name), new_model.get_parameter(name)
            fan_in = p_ref.numel() // p_ref.shape[0] if p_ref.dim() >= 2 else 1
            values = torch.randn(p_ref.numel(), generator=gen, dtype=torch.float64) / fan_in ** 0.5
            p_ref.copy_(values.view(p_ref.shape).to(p_ref.dtype))
            p_new.copy_(values.view(p_new.shape).to(p_new.dtype))
    result = verify(ref_model, new_model, example_input, extra_sizes=extra_sizes, atol=atol, rtol=rtol, seed=seed,
                    _randomise=False)
    result.randomised = names
    return result


FLOAT64_RTOL = 1e-9


def _float64_checks(original: nn.Module, rewritten: nn.Module, example_input: torch.Tensor,
                    extra_sizes: Sequence[Sequence[int]], seed: int) -> list[SizeCheck]:
    """The float32 outputs differ by more than the tolerance, with no structural error. Deep
    networks with random weights (timm's EfficientNetV2: activations ~1e3 through a dozen
    squeeze-excite gates) amplify float32 rounding past any fixed tolerance: the unmodified model
    misses it against itself with another conv backend. In float64 rounding is ~1e-16, so a
    correct rewrite matches to ~1e-12 relative and a wrong one stays of the order of the outputs;
    compare there (on copies: the caller's models are not changed)."""
    import copy

    try:
        ref_model, new_model = copy.deepcopy(original).double().eval(), copy.deepcopy(rewritten).double().eval()
    except Exception:  # noqa: BLE001 - a module that cannot be copied or cast: no second opinion
        return []
    checks = _compare_at_sizes(ref_model, new_model, example_input, extra_sizes, seed, 0.0, FLOAT64_RTOL,
                               dtype=torch.float64)
    return [] if any(c.error is not None for c in checks) else checks


def _compare_at_sizes(original: nn.Module, rewritten: nn.Module, example_input: torch.Tensor,
                      extra_sizes: Sequence[Sequence[int]], seed: int, atol: float, rtol: float,
                      dtype: torch.dtype | None = None, reference_outputs: dict | None = None) -> list[SizeCheck]:
    """One `SizeCheck` per shape (the example's, then `extra_sizes`), on seeded random inputs
    (cast to `dtype` if given). The original's outputs come from `reference_output`."""
    checks: list[SizeCheck] = []
    cache = reference_outputs if reference_outputs is not None else {}
    like = example_input if dtype is None else example_input.to(dtype)
    for i, shape in enumerate([tuple(example_input.shape)] + [tuple(s) for s in extra_sizes]):
        progress.stage(f"verifying at {'x'.join(map(str, shape))}" + (" (float64)" if dtype == torch.float64 else ""))
        x = random_input(shape, like, seed)
        try:
            ref = _reference_at(original, x, seed, cache)
        except Exception as exc:  # noqa: BLE001 - the original itself does not take this size
            checks.append(SizeCheck(shape, float("nan"), float("nan"), 0.0, i > 0,
                                    f"the original model does not run at this size: {type(exc).__name__}: {exc}"))
            continue
        try:
            out = _run(rewritten, x)
        except Exception as exc:  # noqa: BLE001
            checks.append(SizeCheck(shape, float("inf"), float("inf"), 0.0, False,
                                    f"the rewritten model fails: {type(exc).__name__}: {exc}"))
            continue
        abs_err, rel_err, scale, ok, error = compare_outputs(ref, out, atol, rtol)
        checks.append(SizeCheck(shape, abs_err, rel_err, scale, ok, error))
    return checks
