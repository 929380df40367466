"""User-facing errors: one clear message, no traceback, a distinct exit status."""


class OffbatchError(Exception):
    """An error the user can act on; the CLI prints its message and exits with `exit_code`."""

    exit_code = 3


class ModelFolderError(OffbatchError):
    """The model folder cannot be used (bad config, missing/corrupt tensors, unsupported family)."""


class InputFileError(OffbatchError):
    """A prompts file cannot be read at all (as opposed to one bad line, which is a per-line error)."""


class BudgetError(OffbatchError):
    """A memory budget too small to run at all."""
