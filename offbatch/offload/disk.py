"""The disk tier: modules that do not fit in pinned host memory stay in the checkpoint's files and are
read, every time they are used, straight into a small ring of pinned staging buffers, from which the
copy stream takes them to the device.

A module's tensors are read with positioned reads (`os.preadv`) of whole tensors, so a module is a few
large reads: no page mapping, no Python loop over bytes. They bypass the page cache (O_DIRECT through an
aligned bounce buffer, direct_io.py) where the file system allows it, so a disk-bound plan runs at the
disk's rate however often the file was read before; elsewhere they land directly in pinned memory. A tensor stored in another dtype than the engine computes in is read through the
checkpoint's memory map and converted instead, and so is one that the weight format encodes (slower;
the planner prices disk reads at the probed rate either way).

One reader thread works through the modules in the order the engine will use them, as far ahead as
there are free staging buffers. A buffer is reused only after the copy out of it has finished on the
device (its CUDA event); on the CPU the copy is synchronous and the buffer is free at once.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from offbatch.errors import OffbatchError
from offbatch.formats import Layout, WeightFormat
from offbatch.models.catalogue import Part
from offbatch.offload.direct_io import BounceBuffer, open_direct

CHUNK = 64 << 20  # bytes per read call: large enough for the disk, small enough to stay responsive


@dataclass(frozen=True)
class TensorRead:
    """One tensor (or row slice) of a module: where it lies in the file and where it goes in the
    module's buffer."""

    canonical: str
    file: str
    file_offset: int
    nbytes: int
    buf_offset: int
    direct: bool  # stored unchanged in the checkpoint's dtype: read the bytes as they are
    part: Part | None = None  # what the store converts or encodes when not direct


def module_reads(source, layout: Layout, parts: list[Part], dtype: torch.dtype, fmt: WeightFormat) -> list[TensorRead]:
    """How to fill a module's flat buffer from the checkpoint: a tensor is read as it is where the format
    stores it unchanged and the checkpoint holds it in the compute dtype, or where the folder holds it
    in this format already (each stored tensor read as it is)."""
    from offbatch.models.loader import SAFETENSORS_DTYPES

    ckpt = getattr(source, "ckpt", None)
    if ckpt is None:
        raise OffbatchError("the disk tier reads modules from a model folder; synthetic weights have none "
                            "(give more --cpu-memory, or write the model with `offbatch synth` first)")
    reads = []
    for part in parts:
        e = ckpt.entry(part.canonical)
        shape = part.shape(e.shape)
        if e.stored and ckpt.format.name == fmt.name:
            reads += [_read(part, s, layout.item(part.local + suffix).offset, True) for suffix, s in e.stored]
            continue
        direct = not e.stored and SAFETENSORS_DTYPES[e.dtype] == dtype and fmt.unchanged(part.local, shape, dtype)
        reads.append(_read(part, e, layout.item(part.local).offset if direct else -1, direct))
    return sorted(reads, key=lambda r: (r.file, r.file_offset))


def clip_reads(reads: list[TensorRead], lo: int, hi: int) -> list[TensorRead]:
    """The direct reads of a module's bytes [lo, hi) only, into a buffer that holds just that range (a rank
    of a split weight stream reads its share of each module). Reads that convert are left out: the store
    builds those modules whole and keeps the range."""
    out = []
    for r in reads:
        if not r.direct:
            continue
        a, b = max(lo, r.buf_offset), min(hi, r.buf_offset + r.nbytes)
        if a < b:
            out.append(dataclasses.replace(r, file_offset=r.file_offset + a - r.buf_offset, nbytes=b - a,
                                           buf_offset=a - lo))
    return out


def _read(part: Part, e, buf: int, direct: bool) -> TensorRead:
    """A TensorRead of a whole tensor, or of the part's rows (one contiguous range of a row-major
    tensor's bytes)."""
    offset, nbytes = e.offset, e.nbytes
    if part.rows is not None:
        row = e.nbytes // e.shape[0]
        offset, nbytes = e.offset + part.rows[0] * row, (part.rows[1] - part.rows[0]) * row
    return TensorRead(part.canonical, str(e.file), offset, nbytes, buf, direct, part)


class ModuleFiles:
    """Open file descriptors of the checkpoint, shared by the reads (positioned reads need no seek):
    O_DIRECT ones where the file system takes them (direct_io.py: the disk, not the page cache), else
    buffered; and the bounce buffer the direct reads go through (one reader thread uses it)."""

    def __init__(self, direct: bool = True):
        """direct: read with O_DIRECT where the file system takes it (the disk tier's reads, priced at the
        disk's rate); False: buffered (the one-time load into host memory, which a warm page cache serves)."""
        self.direct = direct
        self.fds: dict[str, tuple[int, bool]] = {}
        self.lock = threading.Lock()
        self.bounce: BounceBuffer | None = None
        self.direct_bytes = self.buffered_bytes = 0  # read past the page cache, and through it (bench says)

    def fd(self, path: str) -> tuple[int, bool]:
        """(file descriptor, whether it reads with O_DIRECT)."""
        with self.lock:
            if path not in self.fds:
                fd = open_direct(path) if self.direct else None
                self.fds[path] = (fd, True) if fd is not None else (os.open(path, os.O_RDONLY), False)
            return self.fds[path]

    def bounce_buffer(self) -> BounceBuffer:
        if self.bounce is None:
            self.bounce = BounceBuffer(CHUNK)
        return self.bounce

    def close(self) -> None:
        with self.lock:
            for fd, _ in self.fds.values():
                os.close(fd)
            self.fds.clear()


def read_module(store, key, out: torch.Tensor, files: ModuleFiles) -> None:
    """Fill `out` (uint8, at least the module's size, on the host) with the module's packed bytes."""
    read_into(store.disk[key], out, files, lambda parts, buf: store.fill(key, parts, buf))


def read_into(reads: list[TensorRead], out: torch.Tensor, files: ModuleFiles,
              fill: Callable[[list[Part], torch.Tensor], None]) -> None:
    """Fill a module's buffer from its TensorReads: positioned reads of the raw bytes where they are
    stored as they are; the rest through `fill(parts, out)` (the store's converting path)."""
    read_raw(reads, out, files)
    rest = [r.part for r in reads if not r.direct]
    if rest:
        fill(rest, out)


def read_raw(reads: list[TensorRead], out: torch.Tensor, files: ModuleFiles) -> None:
    """The positioned reads of read_into only (the bytes stored as they are); safe to run on several
    threads at once for different modules, each with its own ModuleFiles."""
    arr = out.numpy()
    for r in reads:
        if not r.direct:
            continue
        (fd, direct), done = files.fd(r.file), 0
        while done < r.nbytes:
            n = min(CHUNK, r.nbytes - done)
            dest = arr[r.buf_offset + done : r.buf_offset + done + n]
            if direct:
                got = files.bounce_buffer().read(fd, r.file_offset + done, dest)
                files.direct_bytes += max(got, 0)
            else:
                got = os.preadv(fd, [memoryview(dest)], r.file_offset + done)
                files.buffered_bytes += max(got, 0)
            if got <= 0:
                raise OffbatchError(f"{r.file} ended while reading tensor {r.canonical!r} (was the file "
                                    "changed or truncated after the run started?)")
            done += got


class DiskReader:
    """Reads disk-tier modules ahead, in use order, into a ring of pinned staging buffers."""

    def __init__(self, store, buffers: int, pin: bool):
        self.store = store
        size = max(store.nbytes(k) for k in store.disk)
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(max(1, buffers))]
        self.files = ModuleFiles()
        self.free: deque[int] = deque(range(len(self.buffers)))
        self.reuse_after: list = [None] * len(self.buffers)  # event of the last copy out of a buffer
        self.pending: deque = deque()  # modules to read, in use order
        self.ready: dict = {}  # module -> deque of buffer indices holding it, oldest first
        self.reading = None  # the module being read now
        self.cancel_reading = 0  # reads in flight whose result is not wanted any more
        self.error: BaseException | None = None
        self.closed = False
        self.bytes_read = 0
        self.read_s = 0.0
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="offbatch-disk-reader", daemon=True)
        self.thread.start()

    @property
    def staging_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    # ---- the engine's side ---------------------------------------------------------------------------
    def request(self, keys) -> None:
        with self.cv:
            self.pending.extend(keys)
            self.cv.notify_all()

    def cancel(self, key) -> None:
        """One earlier request of this module is not needed: drop it, or free the buffer it landed in."""
        with self.cv:
            if key in self.pending:
                self.pending.remove(key)
            elif self.ready.get(key):
                self._give_back(self.ready[key].popleft(), None)
                if not self.ready[key]:
                    del self.ready[key]
            elif self.reading == key:
                self.cancel_reading += 1
            self.cv.notify_all()

    def take(self, key, block: bool) -> tuple[int, torch.Tensor] | None:
        """(index, buffer) holding the module, or None when it is not read yet and block is False."""
        with self.cv:
            while True:
                if self.error is not None:
                    raise OffbatchError(f"reading weights from disk failed: {self.error}") from self.error
                q = self.ready.get(key)
                if q:
                    idx = q.popleft()
                    if not q:
                        del self.ready[key]
                    return idx, self.buffers[idx]
                if not block:
                    return None
                if key not in self.pending and self.reading != key:
                    raise RuntimeError(f"module {key} was taken from the disk reader without being requested")
                self.cv.wait()

    def give_back(self, idx: int, event=None) -> None:
        """The copy out of buffer idx was issued; it may be refilled once `event` (if any) completes."""
        with self.cv:
            self._give_back(idx, event)
            self.cv.notify_all()

    def _give_back(self, idx: int, event) -> None:
        self.reuse_after[idx] = event
        self.free.append(idx)

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        self.thread.join(timeout=10)
        self.files.close()

    # ---- the reader thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        import time

        while True:
            with self.cv:
                while not self.closed and not (self.pending and self.free):
                    self.cv.wait()
                if self.closed:
                    return
                key, idx = self.pending.popleft(), self.free.popleft()
                self.reading, event = key, self.reuse_after[idx]
            try:
                if event is not None:
                    event.synchronize()  # the last copy out of this buffer has finished
                t = time.perf_counter()
                read_module(self.store, key, self.buffers[idx], self.files)
                self.read_s += time.perf_counter() - t
                self.bytes_read += self.store.nbytes(key)
            except BaseException as exc:  # surfaced to the engine at its next take()
                with self.cv:
                    self.error, self.reading = exc, None
                    self.cv.notify_all()
                return
            with self.cv:
                self.reading = None
                if self.cancel_reading:
                    self.cancel_reading -= 1
                    self._give_back(idx, None)
                else:
                    self.ready.setdefault(key, deque()).append(idx)
                self.cv.notify_all()


def read_module_now(store, key) -> torch.Tensor:
    """A module's packed bytes in a fresh host buffer (resident modules at start-up, post-norm weights)."""
    out = torch.empty(store.nbytes(key), dtype=torch.uint8)
    files = ModuleFiles()
    try:
        read_module(store, key, out, files)
    finally:
        files.close()
    return out

