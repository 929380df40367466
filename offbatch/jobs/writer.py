"""The writer that puts each result record on disk the moment it finishes.

Outputs are of two kinds (`is_stream`):
- a regular file (or a path that does not exist yet): appended to, fsynced, resumable, locked
  (jobs/lock.py) and cut back by resume (jobs/ledger.py);
- a stream: `-` (stdout), an existing FIFO, character device or socket (/dev/null, a terminal), and
  /dev/stdout, /dev/stderr, /dev/fd/N, /proc/*/fd/N whatever they point to. A stream is only ever
  written, in append mode: never read (reading /dev/stdout that is a pipe waits forever), never
  truncated, locked, rewritten or fsynced (a pipe cannot be).

A write that fails (a full disk, a file-size limit, an I/O error) is one OutputFileError saying how
many records are safely in the file and to rerun to resume (a pipe whose reader went away raises its
BrokenPipeError, which the CLI turns into the quiet exit 141); never a traceback, and every
record written before it stays whole (a torn last line is what resume cuts off). SIGXFSZ is ignored
so that a file-size limit (RLIMIT_FSIZE) makes write() fail with EFBIG instead of killing the process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from offbatch.errors import OutputFileError

_STREAM_PATHS = re.compile(r"^/(dev/(stdout|stderr|stdin|fd/\d+)|proc/(self|\d+)/fd/\d+)$")


def is_stream(path: str | Path) -> bool:
    """True for outputs that are written but never read, locked or rewritten (see the module doc)."""
    path = str(path)
    if path == "-" or _STREAM_PATHS.match(os.path.abspath(path)):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False  # does not exist (yet): a file
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def ignore_file_size_signal() -> None:
    """Let a file-size limit fail the write (EFBIG) instead of killing the process with SIGXFSZ."""
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (ValueError, AttributeError, OSError):  # not the main thread, or no such signal here
        pass


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


class ResultWriter:
    """Appends one JSON line per record. Every record reaches the OS in one write, so a crash of this
    process loses nothing written. fsync (which also survives a machine crash) runs on a write when
    `fsync_every` seconds have passed since the last one, from a background timer when results stop
    coming, and at close: thousands of short results do not each wait on the disk.

    `stamp(record)` (optional) may add to a record before it is written (the runner adds each result's
    resume key, see ledger.stamp_key). `on_disk` is how many records the file already held: the error
    message for a failed write counts from it."""

    def __init__(self, path: str | Path, fsync_every: float = 1.0, truncate: bool = False,
                 stamp: Callable[[dict], None] | None = None, on_disk: int = 0):
        self.path = str(path)
        self.fsync_every = fsync_every
        self.count = 0
        self.on_disk = on_disk
        self._stamp = stamp
        self._error: str | None = None
        self._reported = False  # the failure has been raised to the caller once
        self._lock = threading.Lock()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._closed = threading.Event()
        self._timer = None
        self._fd: int | None = None
        self._text = None  # sys.stdout for "-"
        self.stream = is_stream(self.path)
        ignore_file_size_signal()
        if self.path == "-":
            if sys.stdout is None:  # started with stdout closed (`>&-`)
                raise OutputFileError("-o - writes the results to stdout, which is closed; name an output file")
            self._text = sys.stdout
        else:
            self._fd = self._open(truncate and not self.stream)
        self._fsync = self._fd is not None and stat.S_ISREG(os.fstat(self._fd).st_mode)
        if self._fsync:
            self._timer = threading.Thread(target=self._sync_loop, name="offbatch-fsync", daemon=True)
            self._timer.start()

    def _open(self, truncate: bool) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as e:
            raise OutputFileError(f"{self.path} cannot be written: {_why(e)}") from None

    def _fail(self, e: OSError, doing: str) -> OutputFileError:
        """Remember the first failure (every later write refuses with the same message) and return the
        error to raise."""
        if self._error is None:
            where = "stdout" if self.path == "-" else self.path
            what = f"{doing} {where} failed: {_why(e)}"
            if self.stream:
                self._error = f"{what}; {self.count} record(s) were written before it"
            else:
                self._error = (f"{what}; {self.on_disk + self.count} finished record(s) are safe in {self.path}. "
                               "Fix the cause and rerun the same command to resume")
        return OutputFileError(self._error)

    def _check(self) -> None:
        if self._error is not None:
            self._reported = True
            raise OutputFileError(self._error)

    def write(self, record: dict) -> None:
        if self._stamp is not None:
            self._stamp(record)
        # One write per line, so a kill between records can only leave whole lines behind
        # (or, mid-write, one torn last line that the next run cuts off).
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._check()
            try:
                self._write_locked(line)
            except BrokenPipeError as e:  # the reader of a pipe went away (`| head`): the CLI's quiet exit 141
                self._fail(e, "writing")
                self._reported = True
                raise
            except OSError as e:
                self._reported = True
                raise self._fail(e, "writing") from None
            self.count += 1
            self._dirty = True
            if time.monotonic() - self._last_sync >= self.fsync_every:
                try:
                    self._sync_locked()
                except OSError as e:
                    self._reported = True
                    raise self._fail(e, "syncing") from None

    def _write_locked(self, line: str) -> None:
        # backslashreplace: a lone surrogate (which only a JSON string can hold) is written as its JSON
        # escape, instead of failing the write.
        data = line.encode("utf-8", "backslashreplace")
        if self._text is not None:
            buffer = getattr(self._text, "buffer", None)
            if buffer is None:
                self._text.write(data.decode("utf-8"))
            else:
                self._text.flush()
                buffer.write(data)
                buffer.flush()
            return
        data = memoryview(data)
        while data:  # a short write (a size limit reached mid-line) is followed by one that raises
            n = os.write(self._fd, data)
            data = data[n:]

    def _sync_locked(self) -> None:
        if self._fsync and self._dirty and self._fd is not None:
            os.fsync(self._fd)
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_loop(self) -> None:
        while not self._closed.wait(self.fsync_every):
            with self._lock:
                if self._dirty and self._error is None:
                    try:
                        self._sync_locked()
                    except OSError as e:  # reported by the next write or by close
                        self._fail(e, "syncing")

    def sync(self) -> None:
        with self._lock:
            self._check()
            try:
                self._sync_locked()
            except OSError as e:
                self._reported = True
                raise self._fail(e, "syncing") from None

    def close(self) -> None:
        """Sync and close. Raises OutputFileError if the final sync fails, or an earlier failure (of the
        background sync) has not been raised to the caller yet; never twice for one failure."""
        self._closed.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None
        with self._lock:
            if self._fd is None and self._text is None:
                return
            try:
                if self._error is None:
                    if self._text is not None:
                        self._text.flush()
                    self._sync_locked()
            except OSError as e:
                self._fail(e, "syncing")
            finally:
                if self._fd is not None:
                    try:
                        os.close(self._fd)
                    except OSError:
                        pass
                self._fd = self._text = None
            if self._error is not None and not self._reported:
                self._reported = True
                raise OutputFileError(self._error)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
