"""The `offbatch` typer app (one module per command, registered here) and the shell around every
command, which turns whatever happens into one of the exit statuses documented in offbatch/errors.py:

  OffbatchError           its one line on stderr, its status (3)
  a usage error           click's message, 2
  KeyboardInterrupt       "offbatch: interrupted", 130 (anywhere outside the runner, which stops cleanly
                          by itself: loading torch, importing a GGUF, loading the model)
  a closed pipe           nothing, 141: the reader of stdout went away (`-o - | head -1`), as POSIX tools
  any other exception     a bug: one line, 4; the traceback only with OFFBATCH_DEBUG=1

A traceback used to exit 1, the status of "some lines failed", so cron wrappers took crashed runs for
finished ones. The shell wraps the click group's parsing and every command's parsing, conversion and
body, so no exception escapes it, whichever command or argument raised it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from offbatch.errors import EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, OffbatchError

DEBUG_ENV = "OFFBATCH_DEBUG"
MAX_MESSAGE_CHARS = 500  # an internal error's message is one line, however long the exception's text

# (command name, module under offbatch.cli); each module exposes `command`.
COMMANDS = [
    ("inspect", "inspect"),
    ("bench", "bench"),
    ("run", "run"),
    ("import-gguf", "import_gguf"),
    ("synth", "synth"),
    ("plan", "plan"),
    ("eval-ppl", "eval_ppl"),
    ("convert", "convert"),
    ("profile", "profile"),
    ("train-predictors", "train_predictors"),
    ("calibrate-keys", "calibrate_keys"),
]


# ---- exceptions -> exit statuses ----------------------------------------------------------------

def _say(line: str) -> None:
    try:  # stderr may itself be a closed pipe: then there is no one to tell
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def is_broken_pipe(exc: BaseException | None) -> bool:
    """True when exc, or an error it wraps (the writer turns failed writes into OutputFileError), is a
    write to a pipe whose reader has gone away."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, BrokenPipeError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def silence_stdout() -> None:
    """Point stdout's descriptor at /dev/null: what is still buffered for the closed pipe is dropped at
    exit instead of failing again ("Exception ignored ... BrokenPipeError")."""
    try:
        fd = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):  # not a real file (a test's captured stdout)
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


def internal_error_line(exc: BaseException) -> str:
    try:
        message = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still gets its line
        message = ""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " ..."
    where = "the traceback is above" if _debug() else f"rerun with {DEBUG_ENV}=1 for the traceback"
    return (f"offbatch: internal error: {type(exc).__name__}: {message or '(no message)'} "
            f"(this is a bug in offbatch; {where})")


def exit_status(exc: BaseException) -> int:
    """Report `exc` on stderr the documented way and return the exit status it gives."""
    if is_broken_pipe(exc):
        silence_stdout()
        return EXIT_BROKEN_PIPE
    if isinstance(exc, KeyboardInterrupt):
        _say("offbatch: interrupted")
        return EXIT_INTERRUPTED
    if _debug():
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, OffbatchError):
        _say(f"offbatch: error: {exc}")
        return exc.exit_code
    _say(internal_error_line(exc))
    return EXIT_INTERNAL


# click's and typer's own signals pass through: usage errors (TyperException: exit 2, printed by click),
# typer.Exit(code), Abort.
_CLICK_SIGNALS = (typer.Exit, typer.Abort, TyperException)


@contextlib.contextmanager
def exit_statuses():
    try:
        yield
    except _CLICK_SIGNALS:
        raise
    except (Exception, KeyboardInterrupt) as e:  # MemoryError and RecursionError are Exceptions
        raise typer.Exit(exit_status(e)) from None


class OffbatchGroup(TyperGroup):
    """The top-level group: parsing the top-level options (make_context) and invoking a command (which
    makes the command's context, converting its arguments, then runs it) both run inside exit_statuses."""

    def make_context(self, *args, **kwargs):
        with exit_statuses():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with exit_statuses():
            return super().invoke(ctx)


# ---- the app ------------------------------------------------------------------------------------

app = typer.Typer(
    name="offbatch",
    cls=OffbatchGroup,
    help="Offline batch LLM inference on one memory-constrained GPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("offbatch")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from offbatch import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"offbatch {package_version()}")
        raise typer.Exit(0)


@app.callback()
def _top(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print offbatch's version and exit.")] = False,
):
    """Offline batch LLM inference on one memory-constrained GPU."""


def _register_commands() -> None:
    for name, module in COMMANDS:
        app.command(name)(importlib.import_module(f"offbatch.cli.{module}").command)


def _is_the_program() -> bool:
    """This module runs as the `offbatch` console script or `python -m offbatch.cli.main` (not imported
    by a test or a library, which should see a KeyboardInterrupt as one)."""
    return __name__ == "__main__" or Path(sys.argv[0] if sys.argv else "").name == "offbatch"


def hold_closed_standard_fds() -> None:
    """A standard descriptor the caller closed (`<&-`, `>&-`, `2>&-`) is reopened on /dev/null, so that no
    file offbatch opens later (the output, its lock) lands on 0-2, where stray writes to stdout or
    stderr would end up in the results. sys.stdin and sys.stdout stay None, so `-` for either is one
    clear error; sys.stderr writes to /dev/null, since print(file=None) would write to stdout."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                held = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
            except OSError:
                return
            if held != fd:  # a lower descriptor was free after all
                os.dup2(held, fd)
                os.close(held)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


if _is_the_program():
    hold_closed_standard_fds()

try:
    _register_commands()  # imports torch: seconds, in which a Ctrl-C must not print a traceback
except KeyboardInterrupt:
    if not _is_the_program():
        raise
    _say("offbatch: interrupted")
    sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    except (Exception, KeyboardInterrupt) as e:  # pragma: no cover - the group's shell catches them first
        code = exit_status(e)
    try:  # what is still buffered for stdout is written now, where a closed pipe can be handled
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`)
            sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        code = EXIT_BROKEN_PIPE
    except (OSError, ValueError):
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
