"""Shared fixtures: the bundled examples, loaded through mixfx's own loader."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="session")
def example_path():
    def _path(name: str) -> str:
        return str(EXAMPLES / f"{name}.py")

    return _path


_REPORTS: dict[str, object] = {}


@pytest.fixture(scope="session")
def example_report():
    """Analysis report of an example, computed once per session."""
    from mixfx import analyze, load_model

    def _report(name: str):
        if name not in _REPORTS:
            loaded = load_model(str(EXAMPLES / f"{name}.py"))
            _REPORTS[name] = analyze(loaded.module, loaded.example_input, name=loaded.name)
        return _REPORTS[name]

    return _report
