"""The writer that puts each result record on disk the moment it finishes."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from offbatch.errors import InputFileError


class ResultWriter:
    """Appends one JSON line per record. Every record is flushed to the OS at once, so a crash of this
    process loses nothing written. fsync (which also survives a machine crash) runs on a write when
    `fsync_every` seconds have passed since the last one, from a background timer when results stop
    coming, and at close: thousands of short results do not each wait on the disk."""

    def __init__(self, path: str | Path, fsync_every: float = 1.0, truncate: bool = False):
        self.path = str(path)
        self.fsync_every = fsync_every
        self.count = 0
        if self.path == "-":
            self._file, self._owned = sys.stdout, False
        else:
            try:
                mode = "w" if truncate else "a"
                self._file, self._owned = open(self.path, mode, encoding="utf-8", newline="\n"), True
            except OSError as e:
                raise InputFileError(f"{self.path} cannot be written: {e.strerror or e}") from None
        self._lock = threading.Lock()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._closed = threading.Event()
        self._timer = None
        if self._owned:
            self._timer = threading.Thread(target=self._sync_loop, name="offbatch-fsync", daemon=True)
            self._timer.start()

    def write(self, record: dict) -> None:
        # One write call per line, so a kill between records can only leave whole lines behind
        # (or, mid-write, one torn last line that the next run cuts off).
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self.count += 1
            self._dirty = True
            if time.monotonic() - self._last_sync >= self.fsync_every:
                self._sync_locked()

    def _sync_locked(self) -> None:
        if self._owned and self._dirty and not self._file.closed:
            os.fsync(self._file.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_loop(self) -> None:
        while not self._closed.wait(self.fsync_every):
            with self._lock:
                if self._dirty:
                    self._sync_locked()

    def sync(self) -> None:
        with self._lock:
            self._sync_locked()

    def close(self) -> None:
        self._closed.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None
        with self._lock:
            if self._file.closed:
                return
            self._file.flush()
            self._sync_locked()
            if self._owned:
                self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
