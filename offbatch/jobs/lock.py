"""An exclusive lock on a results file for the duration of one run.

The lock is `flock(LOCK_EX | LOCK_NB)` on a lock file beside the output, `OUT.lock`, which offbatch
never renames or replaces (the output itself is rewritten by rename when resume cuts it back, so a
lock on the output's own inode would be lost with it). A second run on the same output fails at once
with one clear OutputFileError naming the holder's pid (written into the lock file). The kernel drops
the lock when its holder dies, even by SIGKILL, so a lock file left behind never blocks a later run.
The lock file is removed at the end of the run when possible; a run that finds, after taking the
lock, that the path no longer names the file it locked (another run removed it meanwhile) tries again.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from offbatch.errors import OutputFileError


def lock_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".lock")


class OutputLock:
    """`with OutputLock(path):` holds the lock on the output at `path`; release() is idempotent."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.path = lock_path_for(self.output)
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        for _ in range(100):  # a retry only follows a lock file removed under us: rare, and never twice running
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputFileError(self._busy_message()) from None
                raise OutputFileError(f"{self.output} cannot be locked ({self.path}: {e.strerror or e})") from None
            if self._still_named(fd):
                self._fd = fd
                self._write_pid()
                return self
            os.close(fd)
        raise OutputFileError(f"{self.output} cannot be locked: {self.path} keeps being replaced")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputFileError(f"{self.output} cannot be written: its lock file {self.path} cannot be created "
                                  f"({e.strerror or e})") from None

    def _still_named(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_pid(self) -> None:
        try:  # only informative (for the message a second run prints): a full disk must not stop the run
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass

    def _busy_message(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        holder = f"another offbatch run (pid {pid})" if pid.isdigit() else "another offbatch run"
        return (f"{self.output} is in use by {holder}: two runs on one output would write every result twice. "
                "Wait for it to finish (or stop it), or give this run another -o")

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # remove while still holding the lock, so no third run locks the old file after we let go
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
