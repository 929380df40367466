"""User-facing errors: one clear message, no traceback, a distinct exit status.

Exit statuses of every command (the README documents them):
  0  done, every line succeeded
  1  done, some lines failed (each has an error record)
  2  usage error (a bad option or argument; printed by the command-line parser)
  3  fatal error the user can act on (an OffbatchError: bad model folder, unreadable input, an output
     that is refused, locked or cannot be written, an impossible budget); nothing finished is lost
  4  internal error (a bug in offbatch): one line on stderr, the traceback with OFFBATCH_DEBUG=1
  130 / 143 / 129  stopped by SIGINT / SIGTERM / SIGHUP (every finished result is on disk; rerun to resume)
  141  stdout (or another output pipe) was closed by its reader (`offbatch run ... -o - | head -1`): the
       quiet exit of a POSIX tool killed by SIGPIPE (128 + 13), so a shell with `set -o pipefail` sees
       that the run did not finish
The CLI shell (offbatch/cli/main.py) maps every exception to one of these; nothing else exits.
"""

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_FATAL = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class OffbatchError(Exception):
    """An error the user can act on; the CLI prints its message and exits with `exit_code`."""

    exit_code = EXIT_FATAL


class ModelFolderError(OffbatchError):
    """The model folder cannot be used (bad config, missing/corrupt tensors, unsupported family)."""


class InputFileError(OffbatchError):
    """A prompts file cannot be read at all (as opposed to one bad line, which is a per-line error)."""


class OutputFileError(OffbatchError):
    """The results file is refused (not this job's, locked by another run) or cannot be written."""


class BudgetError(OffbatchError):
    """A memory budget too small to run at all, or larger than the machine has."""


class PlanFileError(OffbatchError):
    """A saved plan file that cannot be used (wrong version, absurd or mistyped values)."""
