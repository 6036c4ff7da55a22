"""Export a model to ONNX or a torch.export program with the dynamic shapes the analysis found,
then load the written file and check it against eager at the example and two other sizes.

The file is written into a temporary folder beside the destination and moved into place only
after it ran at every size within tolerance: a failed export or verification leaves nothing
behind, and an existing file is replaced atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mixfx.errors import MixfxError, OutputError, UsageError, VerificationError
from mixfx.export_shapes import ExportShapes, derive_export_shapes
from mixfx.shapes import _light_floordiv_simplify, flatten_outputs  # torch.export's FloorDiv: see there

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}
RTOL = 1e-4  # max abs error <= RTOL * max |eager output|
DYNAMIC_EXPORT_BUDGET_S = 60.0  # CPU seconds for one torch.export call with dynamic dims
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class MissingDependencyError(UsageError):
    """An optional package the requested output needs is not installed."""

    kind = "dependency"


class ExportError(MixfxError):
    """torch.export or the ONNX exporter refused the model."""

    kind = "export"


class ExportVerificationError(VerificationError):
    """The written file's outputs differ from eager (or it does not run) at some size."""

    def __init__(self, message: str, hint: str | None = None, result: "ExportResult | None" = None):
        super().__init__(message, hint)
        self.result = result


@dataclass
class SizeCheck:
    input_shape: list[int]
    passed: bool
    max_abs_err: float = float("nan")
    max_rel_err: float = float("nan")  # max abs error / max |eager output|
    ref_scale: float = float("nan")
    error: str | None = None


@dataclass
class ExportResult:
    path: str  # where the file is (after verification), or would have been
    format: str  # "onnx" | "pt2"
    shapes: ExportShapes
    checks: list[SizeCheck] = field(default_factory=list)
    dynamic_shapes_used: str = "mixfx"  # "mixfx", "mixfx+torch-refined", "static", "auto (fallback)"
    rewrite: Any = None  # the RewriteResult when `to` was given
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    bytes_written: int = 0

    @property
    def verified(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "format": self.format,
            "verified": self.verified,
            "dynamic_shapes": self.dynamic_shapes_used,
            "shapes": self.shapes.to_dict(),
            "checks": [{k: (None if isinstance(v, float) and v != v else v) for k, v in vars(c).items()}
                       for c in self.checks],  # NaN (no comparison: the file did not run) -> null
            "rewrite": None if self.rewrite is None else {"target": self.rewrite.target,
                                                          "changes": len(self.rewrite.changes)},
            "notes": list(self.notes),
            "timings": dict(self.timings),
            "bytes": self.bytes_written,
        }


# ----------------------------------------------------------------------------- public entry point
def export(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    to: str | None = None,
    leaves: Sequence = (),
    input_path: str | os.PathLike | None = None,
    rtol: float = RTOL,
    shapes: ExportShapes | None = None,
) -> ExportResult:
    """Export `model` to `path` (`.onnx` or `.pt2`) with dynamic spatial dims, verified.

    `to` runs `mixfx.rewrite(model, to)` first (its own numeric check included). The spatial
    dims get the constraints `derive_export_shapes` found (a `fixed` model exports static). The
    written file is loaded (onnxruntime CPU / torch.export.load) and run at the example size and
    two other sizes meeting the constraints, compared with eager (max abs error <= rtol * max
    |output|). Raises `UsageError` (bad suffix), `MissingDependencyError` (no onnx packages),
    `ExportError` (torch refused), `ExportVerificationError` (mismatch: nothing written) and
    `OutputError` (destination not writable, or it is `input_path`). `shapes`: a spec from an
    earlier export of the same model (`result.shapes`) skips the analysis."""
    target = Path(path).expanduser().absolute()
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot tell the export format from {str(path)!r}: the file name must end in "
                         f".onnx or .pt2 (got {target.suffix or 'no suffix'!r}).",
                         "Use -o model.onnx for ONNX or -o model.pt2 for a torch.export program.")
    if fmt == "onnx":
        require_onnx()
    _check_destination(target, input_path)
    timings: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        rewritten = None
        if to is not None:
            from mixfx.rewrite import rewrite

            t0 = time.perf_counter()
            rewritten = rewrite(model, to, example_input, leaves=tuple(leaves))
            model = rewritten.module.eval()
            timings["rewrite_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if shapes is None:
            shapes = derive_export_shapes(model, example_input, leaves=leaves)
        timings["analysis_s"] = time.perf_counter() - t0
        result = ExportResult(str(target), fmt, shapes, rewrite=rewritten, notes=list(shapes.notes))
        if shapes.pinned_by is not None:
            result.notes.append("`--to polymorphic` (mixfx.rewrite(model, to='polymorphic')) may cure it"
                                + (f"; {shapes.pinned_by.cure}" if shapes.pinned_by.cure else ""))
        t0 = time.perf_counter()
        program = _export_within_budget(model, example_input, shapes, result)
        shapes = result.shapes
        if result.dynamic_shapes_used != "mixfx":  # torch chose the dims: read what it assumed
            from mixfx.export_domain import narrow_to_program

            shapes, narrowed = narrow_to_program(shapes, program)
            result.shapes = shapes
            result.notes.extend(narrowed)
        sizes = _sizes_the_program_accepts(program, shapes, result)
        shapes = result.shapes
        timings["export_s"] = time.perf_counter() - t0
        with _staging(target) as staged:
            t0 = time.perf_counter()
            with _light_floordiv_simplify():  # the ONNX converter re-traces the program
                result.notes.extend(_write(program, example_input, staged, fmt))
            timings["write_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            runner = _load(staged, fmt)
            sizes = [tuple(example_input.shape), *sizes]
            result.checks = [_check(model, runner, s, example_input.dtype, rtol) for s in sizes]
            timings["verify_s"] = time.perf_counter() - t0
            result.timings = timings
            if not result.verified:
                bad = next(c for c in result.checks if not c.passed)
                what = bad.error or f"max rel err {bad.max_rel_err:.3g} > {rtol:g}"
                raise ExportVerificationError(
                    f"the exported {fmt} file does not match the eager model at "
                    f"{'x'.join(map(str, bad.input_shape))} ({what}); nothing was written.",
                    "Run with --debug for details, or export static (--input at the one size you need).",
                    result)
            result.bytes_written = sum(f.stat().st_size for f in staged.parent.iterdir())
            _commit(staged, target)
        return result
    finally:
        if was_training:
            model.train()


def require_onnx() -> None:
    """Raise a clear `MissingDependencyError` unless onnx, onnxscript and onnxruntime import."""
    import importlib

    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"ONNX export needs {', '.join(ONNX_PACKAGES)}; not installed: {', '.join(missing)}.",
            "Install them with `pip install 'mixfx[onnx]'`, or export a torch.export program with -o model.pt2.")


# ----------------------------------------------------------------------------- steps
def _check_destination(target: Path, input_path) -> None:
    from mixfx.saving import check_destination

    check_destination(target, input_path)
    if target.is_dir():
        raise OutputError(f"{str(target)!r} is a folder.", "Give a file name ending in .onnx or .pt2.")


def _is_constraint_violation(exc: BaseException) -> bool:
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    if isinstance(exc, ConstraintViolationError):
        return True
    return isinstance(exc, UserError) and exc.error_type == UserErrorType.CONSTRAINT_VIOLATION


def _torch_export(model: nn.Module, x: torch.Tensor, shapes: ExportShapes, result: ExportResult):
    """torch.export with mixfx's spec. A spec torch refuses is refined with torch's own
    suggested fixes (`refine_dynamic_shapes_from_suggested_fixes`) when it gives some; failing
    that (or when torch fails inside its constraint solver), the dims are exported as
    `Dim.AUTO` and the verification at other sizes decides."""
    from torch.export import Dim
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    dynamic = shapes.to_torch()
    result.dynamic_shapes_used = "static" if shapes.static else "mixfx"
    first_error: BaseException | None = None
    for _ in range(3):
        try:
            return _export_once(model, x, dynamic, budget=not shapes.static)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds; sorted out below
            if shapes.static:
                raise ExportError(f"torch.export could not export the model: {_first_line(exc)}",
                                  "Run with --debug for the full trace.") from exc
            first_error = first_error or exc
            if not _is_constraint_violation(exc):
                break
            try:
                dynamic = refine_dynamic_shapes_from_suggested_fixes(_suggested_fixes(exc), dynamic)
            except Exception:  # noqa: BLE001 - no suggested fixes in the message
                break
            result.dynamic_shapes_used = "mixfx+torch-refined"
            result.notes.append("torch.export refined mixfx's dynamic shapes with its suggested fixes")
    auto = {shapes.arg_name: {d.axis: Dim.AUTO for d in shapes.dims}}
    result.dynamic_shapes_used = "auto (fallback)"
    result.notes.append(f"torch.export failed on mixfx's dynamic shapes ({_first_line(first_error)}); "
                        "exported with Dim.AUTO instead, checked at the other sizes")
    try:
        return _export_once(model, x, auto, budget=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"torch.export could not export the model: {_first_line(first_error)}",
                          "Run with --debug for the full trace.") from exc


def _suggested_fixes(exc: BaseException) -> str:
    """The part of a constraint violation that `refine_dynamic_shapes_from_suggested_fixes`
    parses: up to the end of the "Suggested fixes:" block (`str(exc)` appends a hint about
    `draft_export()` after it, which that parser reads as a malformed fix)."""
    text = getattr(exc, "msg", None) or str(exc)
    head, sep, fixes = text.partition("Suggested fixes:")
    if not sep:
        return text
    lines = []
    for line in fixes.strip("\n").splitlines():
        if " = " not in line:
            break
        lines.append(line)
    return head + sep + "\n" + "\n".join(lines)


def _sizes_the_program_accepts(program, shapes: ExportShapes, result: ExportResult) -> list[tuple[int, ...]]:
    """The two other verification sizes, from the sizes the exported program itself accepts
    (torch.export may have specialised it to fewer than the analysis found; `result.shapes`
    then becomes the narrower spec, with a note)."""
    from mixfx.export_program import accepted_other_sizes, fit_to_program, program_acceptance

    if shapes.static:
        return []
    accepts = program_acceptance(program)
    if accepts is None or not accepts(shapes.input_shape):  # its checks unreadable here: the runs decide
        return shapes.other_sizes()
    narrowed = fit_to_program(shapes, accepts)
    if narrowed is not shapes:
        result.shapes = narrowed
        result.notes.append(narrowed.notes[-1])
    return accepted_other_sizes(narrowed, accepts)


def _export_once(model: nn.Module, x: torch.Tensor, dynamic, *, budget: bool):
    """One torch.export call; a dynamic one within DYNAMIC_EXPORT_BUDGET_S CPU seconds
    (`SymbolicBudgetExceeded`, a BaseException, passes the callers' `except Exception`)."""
    from mixfx.shapes import time_budget

    with time_budget(DYNAMIC_EXPORT_BUDGET_S if budget else None):
        return torch.export.export(model, (x,), dynamic_shapes=dynamic, strict=False)


def _export_within_budget(model: nn.Module, x: torch.Tensor, shapes: ExportShapes, result: ExportResult):
    """`_torch_export`, each dynamic attempt within DYNAMIC_EXPORT_BUDGET_S CPU seconds; past
    that, a static export at the example size, said in a note and in `result.shapes` (so a
    later export reusing them goes static at once). torch.export's symbolic trace can take
    many minutes where size expressions nest deeply (HaloNet's halo padding: sympy bounding
    nested floor divisions), far longer than mixfx's own symbolic run under its budget."""
    from mixfx.shapes import SymbolicBudgetExceeded

    result.shapes = shapes
    if shapes.static:
        return _torch_export(model, x, shapes, result)
    try:
        with _light_floordiv_simplify():
            return _torch_export(model, x, shapes, result)
    except SymbolicBudgetExceeded:
        pass
    size = "x".join(map(str, (x.shape[d.axis] for d in shapes.dims)))
    why = f"torch.export's dynamic trace took over {DYNAMIC_EXPORT_BUDGET_S:g} CPU s"
    result.shapes = dataclasses.replace(
        shapes, dims=[dataclasses.replace(d, static=True, why=why) for d in shapes.dims], notes=list(shapes.notes))
    result.dynamic_shapes_used = "static"
    result.notes.append(f"{why} (sympy on the nested size expressions): exported static at {size}; "
                        f"the dynamic spec was {'; '.join(shapes.describe())}")
    return _torch_export(model, x, result.shapes, result)


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text[:300]


def _write(program, x: torch.Tensor, staged: Path, fmt: str) -> list[str]:
    """Write the file; returns notes on how (sizes rewritten as integer ops, an ONNX conversion
    that needed a decomposition)."""
    if fmt == "pt2":
        from mixfx.export_program import make_serialisable

        notes = []
        if make_serialisable(program):  # math.ceil/floor of sizes: torch.export.save refuses them
            notes.append("math.ceil/floor of sizes in the exported graph were rewritten as "
                         "integer ops so that torch.export.save can serialise it")
        try:
            torch.export.save(program, str(staged))
        except Exception as exc:  # noqa: BLE001 - the serialiser raises its own kinds
            raise ExportError(f"torch.export.save could not serialise the program: {_first_line(exc)}",
                              "Export to ONNX instead (-o model.onnx), or run with --debug.") from exc
        return notes
    import logging

    log = logging.getLogger(__name__)
    try:
        _write_onnx(program, x, staged)
        return []
    except Exception as exc:  # noqa: BLE001 - the ONNX exporter raises its own kinds
        log.debug("onnx export failed", exc_info=True)
        first = exc
    # The converter lacks a translation for some op form (onnxscript's scaled_dot_product_attention
    # takes 4-D inputs only; window attention passes 5-D): lower the program to core ATen, whose
    # ops all translate, and convert again. The verification that follows checks the result.
    try:
        decomposed = program.run_decompositions()
        _write_onnx(decomposed, x, staged)
    except Exception as exc:  # noqa: BLE001
        log.debug("onnx export after decomposition failed", exc_info=True)
        raise ExportError(f"the ONNX exporter could not convert the exported program: {_root_cause(first)}",
                          "Export a torch.export program instead (-o model.pt2), or run with --debug.") from exc
    return [f"the ONNX exporter could not convert the program as exported ({_root_cause(first)[:120]}); "
            "converted after decomposing it to core ATen ops"]


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's first line: the ONNX exporter wraps the reason
    ("only 4D query, key, and value are supported") in two generic ConversionErrors."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return _first_line(exc)


def _write_onnx(program, x: torch.Tensor, staged: Path) -> None:
    with _quiet_onnx():
        onnx_program = torch.onnx.export(program, (x,), dynamo=True, optimize=True, verbose=False)
        onnx_program.save(str(staged))


@contextlib.contextmanager
def _quiet_onnx():
    """torch.onnx prints progress lines ("[torch.onnx] Obtain model graph ...") to stdout."""
    import io
    import logging
    from contextlib import redirect_stdout

    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


def _load(path: Path, fmt: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function running the written file on one input, as the user would load it."""
    if fmt == "pt2":
        module = torch.export.load(str(path)).module()

        def run_pt2(x: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                return flatten_outputs(module(x))

        return run_pt2
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx(x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]

    return run_onnx


def _check(model: nn.Module, runner, shape: tuple[int, ...], dtype: torch.dtype, rtol: float) -> SizeCheck:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=dtype)
    with torch.no_grad():
        ref = flatten_outputs(model(x))
    try:
        got = runner(x)
    except Exception as exc:  # noqa: BLE001 - the exported file fails at this size: that is the finding
        return SizeCheck(list(shape), False, error=_first_line(exc))
    if len(got) != len(ref):
        return SizeCheck(list(shape), False, error=f"{len(got)} outputs, eager has {len(ref)}")
    abs_err, scale = 0.0, 0.0
    for r, g in zip(ref, got):
        if tuple(r.shape) != tuple(g.shape):
            return SizeCheck(list(shape), False, error=f"output shape {list(g.shape)}, eager {list(r.shape)}")
        r, g = r.detach().double(), g.detach().double()
        abs_err = max(abs_err, float((r - g).abs().max()) if r.numel() else 0.0)
        scale = max(scale, float(r.abs().max()) if r.numel() else 0.0)
    rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
    return SizeCheck(list(shape), rel <= rtol, abs_err, rel, scale)


@contextlib.contextmanager
def _staging(target: Path):
    """A temporary folder beside `target`, removed on the way out (with whatever is left in it)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".mixfx-tmp", dir=target.parent))
    try:
        yield folder / target.name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _commit(staged: Path, target: Path) -> None:
    """Move the staged file (and any ONNX external-data file beside it) into place atomically."""
    try:
        for f in sorted(staged.parent.iterdir(), key=lambda p: p == staged):  # data files first
            os.replace(f, target.parent / f.name)
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {exc}.", "Choose another -o path.") from exc
