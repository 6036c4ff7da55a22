"""Command-line interface: `mixfx analyze` and `mixfx rewrite` (see `mixfx --help`).

A new command is a module here that registers itself on `app` and imports torch-heavy code
inside its function (so that `mixfx --help` stays fast), plus one line in COMMAND_MODULES.
"""
from __future__ import annotations

import importlib
import sys

from mixfx.cli.app import EXIT_BROKEN_PIPE, silence_stdout, app

# Importing the command modules registers their commands on `app`.
COMMAND_MODULES = ("mixfx.cli.analyze", "mixfx.cli.rewrite", "mixfx.cli.export")

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        # typer/click answer a closed stdout outside a command (`mixfx --help | head -1`) with exit
        # 1 after wrapping stdout in a PacifyFlushWrapper; 1 means "--check failed" here
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            silence_stdout()
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        raise
