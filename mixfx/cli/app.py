"""The typer application and the one place that turns errors into messages and exit codes.

Nothing here imports torch: `mixfx --help` and `mixfx --version` answer in a fraction of a
second. The command modules import the library inside their functions.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Callable, Iterator, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from typer.core import TyperArgument, TyperCommand

from mixfx import __version__, progress
from mixfx.errors import EXIT_INTERRUPTED, MixfxError

# stdout was closed before everything was written (`mixfx ... | head -1`): 128 + SIGPIPE, as a
# shell reports a command that a closed pipe killed; distinct from 1 (--check failed)
EXIT_BROKEN_PIPE = 141

EXIT_CODES_HELP = (
    "Exit codes: 0 done, 1 --check failed, 2 usage error, 3 model could not be loaded, traced or "
    "analysed, 4 rewrite not proven equivalent (nothing written), 5 output could not be written, "
    "130 interrupted, 141 output pipe closed early."
)

app = typer.Typer(
    name="mixfx",
    help=(
        "Is this network truly convolutional? mixfx traces a PyTorch model with torch.fx, propagates "
        "symbolic input sizes H and W through every node, and says where shape polymorphism breaks. "
        "It also rewrites Linear <-> 1x1 conv and patchify <-> strided conv, cures fixed-resolution models, turns "
        "classifiers into dense predictors, and exports with dynamic shapes, every result verified numerically.\n\n"
        + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: reads at 80 columns and through pipes
)

class _Console(Console):
    """rich exits 1 on a closed pipe (`Console.on_broken_pipe`): 1 means "--check failed" here."""

    def on_broken_pipe(self) -> None:
        silence_stdout()
        raise SystemExit(EXIT_BROKEN_PIPE)


console = _Console()
err_console = _Console(stderr=True)

# shared option texts (metavars in capitals, as in the usage lines of the README)
SPEC_HELP = "The model: path/to/model.py, model.pt, package.module:attr, timm:NAME or torchvision:NAME."
INPUT_HELP = "Example input shape, e.g. 1x3x256x320 (overrides what the model declares)."
LEAF_HELP = "Module class name or path to treat as one opaque node when tracing (repeatable)."
TRUST_HELP = "Allow loading a pickled module from a .pt file (unpickling can run arbitrary code)."
DEBUG_HELP = "Show full tracebacks instead of one-paragraph errors."

F = TypeVar("F", bound=Callable)


class MixfxCommand(TyperCommand):
    """A command whose arguments read as in the README: `Usage: mixfx analyze [OPTIONS] SPEC` and
    `SPEC  The model: ...` (typer writes `{spec}` and `SPEC <str>`). Pass as `cls=` to
    `app.command`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                name = param.metavar or (param.name or "ARG").upper()
                param._usage_display_name = (lambda name=name, p=param: name if p.required else f"[{name}]")
                param.display_type_rich = lambda ctx: None


def handle_errors(fn: F) -> F:
    """Wrap a command: MixfxError -> one red paragraph + its exit code; `debug=True` re-raises.
    A closed stdout (BrokenPipeError) exits 141 quietly."""

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
        except BrokenPipeError:
            silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except KeyboardInterrupt:
            if debug:
                raise
            err_console.print("[bold red]interrupted:[/] nothing was written.")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not raise again."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def show_progress(enabled: bool = True) -> Iterator[None]:
    """A spinner with the current stage and the elapsed time on stderr, while the library works
    (`mixfx.progress.stage`). Only when stderr is a terminal and `enabled` (off for --json);
    transient: it leaves nothing behind."""
    if not enabled or not err_console.is_terminal:
        with progress.reporting(None):
            yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # stdout stays stdout (the report, JSON): only stderr writes are routed above the spinner
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                   console=err_console, transient=True, redirect_stdout=False)
    task = bar.add_task("starting", total=None)
    with bar, progress.reporting(lambda text: bar.update(task, description=text, refresh=True)):
        yield


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mixfx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", is_eager=True, callback=_version,
                                           help="Print mixfx's version and exit."),
) -> None:
    """Keeps `mixfx` a command group (analyze, rewrite) even when only one command is registered."""
    import logging

    # torch's symbolic-shape and export loggers warn about internals the user cannot act on
    for name in ("torch", "torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
