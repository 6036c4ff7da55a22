"""mixfx: is this network truly convolutional? Symbolic shape analysis and verified rewrites.

Public API (documented in README.md):
- `mixfx.analyze(model, example_input=None, *, input_shape=None) -> AnalysisReport`
- `mixfx.trace(model, example_input=None, *, leaves=()) -> TraceResult`
- `mixfx.rewrite(model, to="conv", example_input=None, passes=None) -> RewriteResult`
- `mixfx.load_model(spec, ...) -> LoadedModel` (the CLI's model specs)
- `mixfx.export(model, example_input, path, *, to=None) -> ExportResult` (verified ONNX / .pt2)
- `mixfx.dynamic_shapes(model, example_input) -> dict` (for torch.export.export)
"""
from __future__ import annotations

from mixfx.analysis import analyze
from mixfx.errors import MixfxError
from mixfx.loading import LoadedModel, load_model
from mixfx.report import AnalysisReport
from mixfx.tracing import TraceResult, trace

try:  # bind the function *after* importing the submodule, so `mixfx.rewrite` is the function
    from mixfx.rewrite import RewriteResult, rewrite
except ModuleNotFoundError as exc:  # pragma: no cover - only while the rewrite module is absent
    if exc.name != "mixfx.rewrite":
        raise

# the function after the submodule: `mixfx.export` is the function, not the module
from mixfx.export import ExportResult, export  # noqa: E402
from mixfx.export_shapes import ExportShapes, dynamic_shapes  # noqa: E402

__version__ = "0.1.0"
__all__ = ["analyze", "trace", "rewrite", "load_model", "AnalysisReport", "TraceResult", "LoadedModel", "MixfxError",
           "export", "dynamic_shapes", "ExportResult", "ExportShapes"]


