"""mixfx: is this network truly convolutional? Symbolic shape analysis and verified rewrites.

Public API (documented in README.md):
- `mixfx.analyze(model, example_input=None, *, input_shape=None) -> AnalysisReport`
- `mixfx.trace(model, example_input=None, *, leaves=()) -> TraceResult`
- `mixfx.rewrite(model, to="conv", example_input=None, passes=None) -> RewriteResult`
- `mixfx.load_model(spec, ...) -> LoadedModel` (the CLI's model specs)
- `mixfx.export(model, example_input, path, *, to=None) -> ExportResult` (verified ONNX / .pt2)
- `mixfx.dynamic_shapes(model, example_input) -> dict` (for torch.export.export)
- `mixfx.tile(model, x, tile=(h, w), *, up_to=None) -> Tensor` (exact tiled inference)

The names are imported on first use (PEP 562 `__getattr__`), so that `import mixfx` and
`mixfx --help` / `--version` do not import torch (about 3 s).
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["analyze", "trace", "rewrite", "load_model", "tile", "AnalysisReport", "TraceResult", "LoadedModel",
           "RewriteResult", "MixfxError", "export", "dynamic_shapes", "ExportResult", "ExportShapes", "__version__"]

# public name -> the submodule that defines it
_LAZY = {
    "analyze": "mixfx.analysis",
    "trace": "mixfx.tracing",
    "TraceResult": "mixfx.tracing",
    "rewrite": "mixfx.rewrite",
    "RewriteResult": "mixfx.rewrite",
    "load_model": "mixfx.loading",
    "LoadedModel": "mixfx.loading",
    "AnalysisReport": "mixfx.report",
    "MixfxError": "mixfx.errors",
    "tile": "mixfx.tiling",
    "export": "mixfx.export",
    "ExportResult": "mixfx.export",
    "dynamic_shapes": "mixfx.export_shapes",
    "ExportShapes": "mixfx.export_shapes",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from mixfx.analysis import analyze
    from mixfx.errors import MixfxError
    from mixfx.export import ExportResult, export
    from mixfx.export_shapes import ExportShapes, dynamic_shapes
    from mixfx.loading import LoadedModel, load_model
    from mixfx.report import AnalysisReport
    from mixfx.rewrite import RewriteResult, rewrite
    from mixfx.tiling import tile
    from mixfx.tracing import TraceResult, trace


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixfx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`mixfx.rewrite` and `mixfx.export` are the functions, even though submodules have the same
    names: importing a submodule makes Python set the package attribute to the module, which is
    turned back into the function here."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("rewrite", "export") and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
