"""Reads that bypass the page cache (O_DIRECT), for the disk tier.

A buffered read of a weight file is served from the page cache once the file has been read before (the
H200 machine's "cold" disk runs read at 5 GB/s against a 1.1 GB/s disk): a disk-bound plan would be
measured at memory speed and priced at the disk's. O_DIRECT reads go to the device every time, but need
the file offset, the length and the buffer address aligned to the device's block size; a tensor in a
safetensors file starts anywhere. So each read covers the aligned range around the wanted bytes, lands in
an aligned bounce buffer and is copied out (a memory copy, several times the disk's rate).

Where the file system refuses O_DIRECT (tmpfs, some network file systems) the reader says so and callers
read buffered. OFFBATCH_DIRECT_IO=0 reads buffered everywhere.
"""

from __future__ import annotations

import errno
import os

import numpy as np

ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks


def enabled() -> bool:
    return os.environ.get("OFFBATCH_DIRECT_IO", "1") != "0" and hasattr(os, "O_DIRECT")


def open_direct(path: str) -> int | None:
    """A file descriptor reading `path` with O_DIRECT, or None where the file system refuses it."""
    if not enabled():
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise


class BounceBuffer:
    """An aligned host buffer of `size` bytes (plus alignment) for O_DIRECT reads."""

    def __init__(self, size: int):
        self.size = -(-size // ALIGN) * ALIGN
        raw = np.empty(self.size + ALIGN, dtype=np.uint8)
        start = (-raw.ctypes.data) % ALIGN
        self.raw, self.buf = raw, raw[start : start + self.size]

    def read(self, fd: int, file_offset: int, dest: np.ndarray) -> int:
        """Read len(dest) bytes at file_offset into dest (any alignment) through aligned O_DIRECT reads of
        at most `size` bytes each. -> bytes placed (fewer only at the end of the file)."""
        want, done = dest.shape[0], 0
        while done < want:
            pos = file_offset + done
            base = pos - pos % ALIGN
            skip = pos - base
            span = min(self.size, -(-(skip + want - done) // ALIGN) * ALIGN)
            got = os.preadv(fd, [memoryview(self.buf[:span])], base)
            if got <= skip:
                return done
            n = min(got - skip, want - done)
            dest[done : done + n] = self.buf[skip : skip + n]
            done += n
        return done
