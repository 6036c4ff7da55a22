"""Command-line interface: `mixfx analyze` and `mixfx rewrite` (see `mixfx --help`)."""
from __future__ import annotations

from mixfx.cli.app import app

# Importing the command modules registers their commands on `app`.
from mixfx.cli import analyze as _analyze  # noqa: F401,E402

try:  # the rewrite command lands with the rewrite passes
    from mixfx.cli import rewrite as _rewrite  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - only while it does not exist yet
    if exc.name != "mixfx.cli.rewrite":
        raise


def main() -> None:
    app()
