"""mixfx: is this network truly convolutional? Symbolic shape analysis and verified rewrites.

Public API (documented in README.md):
- `mixfx.analyze(model, example_input=None, *, input_shape=None) -> AnalysisReport`
- `mixfx.trace(model, example_input=None, *, leaves=()) -> TraceResult`
- `mixfx.rewrite(model, to="conv", example_input=None, passes=None) -> RewriteResult`
- `mixfx.load_model(spec, ...) -> LoadedModel` (the CLI's model specs)
"""
from __future__ import annotations

from mixfx.analysis import analyze
from mixfx.errors import MixfxError
from mixfx.loading import LoadedModel, load_model
from mixfx.report import AnalysisReport
from mixfx.tracing import TraceResult, trace

__version__ = "0.1.0"
__all__ = ["analyze", "trace", "rewrite", "load_model", "AnalysisReport", "TraceResult", "LoadedModel", "MixfxError"]


def __getattr__(name: str):
    # `mixfx.rewrite` (the function) is imported lazily: the rewrite passes pull in more code.
    if name in ("rewrite", "RewriteResult"):
        from mixfx import rewrite as _module

        return getattr(_module, name)
    raise AttributeError(name)
