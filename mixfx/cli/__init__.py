"""Command-line interface: `mixfx analyze` and `mixfx rewrite` (see `mixfx --help`).

A new command is a module here that registers itself on `app` and imports torch-heavy code
inside its function (so that `mixfx --help` stays fast), plus one line in COMMAND_MODULES.
"""
from __future__ import annotations

import importlib

from mixfx.cli.app import app

# Importing the command modules registers their commands on `app`.
COMMAND_MODULES = ("mixfx.cli.analyze", "mixfx.cli.rewrite")

for _name in COMMAND_MODULES:
    importlib.import_module(_name)


def main() -> None:
    app()
