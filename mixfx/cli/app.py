"""The typer application and the one place that turns errors into messages and exit codes."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mixfx.errors import EXIT_INTERRUPTED, MixfxError

app = typer.Typer(
    name="mixfx",
    help=(
        "Is this network truly convolutional? mixfx traces a PyTorch model with torch.fx, propagates "
        "symbolic input sizes H and W through every node, and says where shape polymorphism breaks. "
        "It also rewrites Linear <-> 1x1 conv and patchify <-> strided conv, verified numerically.\n\n"
        "Exit codes: 0 done, 1 --check failed, 2 usage error, 3 model could not be loaded, traced or "
        "analysed, 4 rewrite not proven equivalent (nothing written), 5 output could not be written, "
        "130 interrupted."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Wrap a command: MixfxError -> one red paragraph + its exit code; `debug=True` re-raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = bool(kwargs.get("debug", False))
        try:
            return fn(*args, **kwargs)
        except MixfxError as exc:
            if debug:
                raise
            err_console.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if debug:
                raise
            err_console.print("[bold red]interrupted:[/] nothing was written.")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _stdout_is_tty() -> bool:
    return sys.stdout.isatty()


@app.callback()
def _root() -> None:
    """Keeps `mixfx` a command group (analyze, rewrite) even when only one command is registered."""
    import logging

    # torch's symbolic-shape and export loggers warn about internals the user cannot act on
    for name in ("torch", "torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
