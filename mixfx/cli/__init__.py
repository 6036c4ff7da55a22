"""Command-line interface: `mixfx analyze` and `mixfx rewrite` (see `mixfx --help`)."""
from __future__ import annotations

from mixfx.cli.app import app

# Importing the command modules registers their commands on `app`.
from mixfx.cli import analyze as _analyze  # noqa: F401,E402
from mixfx.cli import export as _export  # noqa: F401,E402

import importlib  # noqa: E402

try:  # the rewrite command lands with the rewrite passes
    importlib.import_module("mixfx.cli.rewrite")
except ModuleNotFoundError as exc:  # pragma: no cover - only while it does not exist yet
    if exc.name != "mixfx.cli.rewrite":
        raise


def main() -> None:
    app()
