"""Errors a user can meet, each with a distinct exit code and a one-paragraph message.

The CLI prints `MixfxError.render()` and exits with `exit_code`; a raw traceback is shown only
with `--debug`. Library callers catch `MixfxError` (or a subclass) and read `.message`/`.hint`.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # `--check` verdict differs
EXIT_USAGE = 2  # bad command-line usage (typer/click also uses 2)
EXIT_MODEL = 3  # the model could not be loaded, traced or analysed
EXIT_VERIFY = 4  # a rewrite could not be proven equivalent: nothing written
EXIT_OUTPUT = 5  # the output could not be written: nothing written
EXIT_INTERRUPTED = 130  # Ctrl-C


class MixfxError(Exception):
    """Base class: `message` says what went wrong, `hint` what to do about it."""

    exit_code: int = EXIT_MODEL
    kind: str = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"

    def __str__(self) -> str:
        return self.render()


class UsageError(MixfxError):
    exit_code = EXIT_USAGE
    kind = "usage"


class ModelLoadError(MixfxError):
    """The model spec could not be turned into an nn.Module (missing file, import error, ...)."""

    kind = "load"


class InputSpecError(MixfxError):
    """The example input does not fit the model (wrong rank, too small, unparsable shape)."""

    kind = "input"


class TraceError(MixfxError):
    """No tracer could turn the model into a graph."""

    kind = "trace"


class AnalysisError(MixfxError):
    kind = "analysis"


class VerificationError(MixfxError):
    """A rewrite's output differs from the original beyond tolerance."""

    exit_code = EXIT_VERIFY
    kind = "verify"


class OutputError(MixfxError):
    exit_code = EXIT_OUTPUT
    kind = "output"
