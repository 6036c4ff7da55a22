"""Progress reporting: the library says which stage it is in, the caller decides what to show.

Library code calls `progress.stage("tracing with torch.fx")` at the start of each slow stage
(one line, no import of rich, nothing happens by default). The CLI wraps a command in
`progress.reporting(callback)`, and shows the stages as a spinner on stderr when stderr is a
terminal (never when piped, never with --json). A context variable, so concurrent callers
(threads, tests) each see only their own reporter.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

Reporter = Callable[[str], None]

_reporter: ContextVar[Reporter | None] = ContextVar("mixfx_progress", default=None)
_current: ContextVar[str | None] = ContextVar("mixfx_progress_stage", default=None)


def stage(text: str) -> None:
    """Announce the stage starting now (e.g. "symbolic run", "verifying at 1x3x224x224")."""
    report = _reporter.get()
    if report is not None:
        _current.set(text)
        report(text)


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    """A sub-stage: announced on entry; on exit the enclosing stage is announced again (tracing
    inside "analysing" does not leave "tracing" on the screen for the rest of the analysis)."""
    previous = _current.get()
    stage(text)
    try:
        yield
    finally:
        if previous is not None:
            stage(previous)


@contextlib.contextmanager
def reporting(callback: Reporter | None) -> Iterator[None]:
    """Send every `stage()` call made inside the block to `callback` (None: silence them)."""
    token, current = _reporter.set(callback), _current.set(None)
    try:
        yield
    finally:
        _current.reset(current)
        _reporter.reset(token)


__all__ = ["stage", "step", "reporting", "Reporter"]
