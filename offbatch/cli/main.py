"""The `offbatch` typer app: one module per command, registered here."""

import functools
import importlib

import typer

from offbatch.errors import OffbatchError

app = typer.Typer(
    name="offbatch",
    help="Offline batch LLM inference on one memory-constrained GPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# (command name, module under offbatch.cli); each module exposes `command`.
COMMANDS = [
    ("inspect", "inspect"),
    ("bench", "bench"),
    ("run", "run"),
    ("import-gguf", "import_gguf"),
    ("synth", "synth"),
    ("plan", "plan"),
]



def user_errors(func):
    """Turn an OffbatchError into one clear line on stderr and its exit status, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OffbatchError as e:
            typer.echo(f"offbatch: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


for _name, _module in COMMANDS:
    app.command(_name)(user_errors(importlib.import_module(f"offbatch.cli.{_module}").command))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
