"""Storing a step's new K/V into host KV off the compute stream's path.

With the KV in host memory, every layer of every step produces K/V rows on the device that belong in
host KV. Copied back with a plain `.to("cpu")`, each layer waits for the device, copies into pageable
memory and scatters on the host while the GPU idles (a 15k-token prefill step of Llama-3-8B spent more
time there than in its GEMMs). Here a copy stream moves the rows into a pinned staging buffer and a
writer thread scatters them into the KV layout once the copy's event has fired; the compute stream
never waits. A small ring of staging buffers bounds how far the device may run ahead of the writer.

Ordering: writes land in submission order (one thread). Readers of a layer's host KV call `settle`
first, which waits for that layer's writes submitted so far; the engine's next read of a layer comes
a whole step after its writes, so the wait is normally already over.

With GPU attention over pinned host KV, a decode step's one row per sequence is written by the GPU itself
(attention/wave.py `gpu_writes`): the thread's per-layer scatter and the GIL it took from the host thread
bound a step whose weights were all resident. This writer keeps the prompts' spans and the other paths.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref

import torch

KV_STAGING_BUFFERS = 3  # staging buffers of the ring: how many layers' stores the device may run ahead


def staging_rows(prefill_tokens: int, max_len: int, wave: int) -> int:
    """Rows of one staging buffer: a step's tokens at most (a prefill budget, at least one whole prompt,
    plus the wave's decode tokens)."""
    return max(prefill_tokens, max_len) + wave


def staging_bytes(fmt, spec, rows: int, buffers: int = KV_STAGING_BUFFERS) -> int:
    """The staging ring's bytes (one allocation): K and V of `rows` tokens of one layer per buffer, in
    the KV format `fmt`."""
    return 2 * buffers * rows * fmt.row_bytes(spec)


class HostKVWriter:
    def __init__(self, kv, rows: int, buffers: int = KV_STAGING_BUFFERS):
        """kv: a WaveKV in host memory; rows: the most K/V rows one staging buffer holds (a step's
        tokens; larger submissions are split)."""
        if rows < 1 or buffers < 1:
            raise ValueError("a host KV writer needs at least one row and one buffer")
        # Weakly: the KV holds its writer, and a strong reference back would make a cycle that keeps the
        # whole host KV alive after its engine until the garbage collector happens to run.
        self._kv = weakref.ref(kv)
        self.rows = rows
        spec = kv.spec
        shape = (rows,) + tuple(kv.row_shape)
        # One allocation for the whole ring: the pinned allocator rounds each allocation to a power of two.
        flat = torch.empty(staging_bytes(kv.format, spec, rows, buffers), dtype=torch.uint8,
                           pin_memory=kv.pinned).view(kv.store_dtype)
        per = flat.numel() // (2 * buffers)
        self._bufs = [(flat[(2 * i) * per : (2 * i + 1) * per].view(shape),
                       flat[(2 * i + 1) * per : (2 * i + 2) * per].view(shape)) for i in range(buffers)]
        self.staging_bytes = flat.numel() * flat.element_size()
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(buffers):
            self._free.put(i)
        self._jobs: queue.Queue = queue.Queue()
        self._submitted = [0] * spec.num_layers
        self._done = [0] * spec.num_layers
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._streams: dict = {}
        self.rows_written = 0
        self.wait_s = 0.0  # compute thread blocked: for a free staging buffer, or in settle
        self._thread: threading.Thread | None = None  # started by the first store, ended by close()

    # ---- submitting (compute thread) -----------------------------------------------------------
    def store_spans(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        """k/v [T, nkv, d] (any device): rows of span (slot, start, n) consecutive, in spans' order,
        go to positions start..start+n of slot."""
        pieces = []  # (source row, slot, start, n), each at most one buffer long
        row = 0
        for slot, start, n in spans:
            while n:
                m = min(n, self.rows)
                pieces.append((row, slot, start, m))
                row, start, n = row + m, start + m, n - m
        if row != k.shape[0]:
            raise ValueError(f"spans cover {row} rows, K/V has {k.shape[0]}")
        i = 0
        while i < len(pieces):
            r0 = pieces[i][0]
            j = i
            while j < len(pieces) and pieces[j][0] + pieces[j][3] - r0 <= self.rows:
                j += 1
            chunk = [(r - r0, slot, start, n) for r, slot, start, n in pieces[i:j]]
            r1 = pieces[j - 1][0] + pieces[j - 1][3]
            self._submit(layer, k, v, r0, r1, ("spans", chunk))
            i = j

    def store_tokens(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots, positions) -> None:
        """One token per row: row j of k/v [b, nkv, d] goes to position positions[j] of slot slots[j]
        (host index tensors, or lists)."""
        slots, positions = torch.as_tensor(slots), torch.as_tensor(positions)
        for r0 in range(0, len(slots), self.rows):
            r1 = min(len(slots), r0 + self.rows)
            self._submit(layer, k, v, r0, r1, ("tokens", slots[r0:r1], positions[r0:r1]))

    def _submit(self, layer, k, v, r0, r1, dest) -> None:
        self._raise()
        kv = self._kv()
        k, v = kv.encode(k[r0:r1]), kv.encode(v[r0:r1])  # packed on the device: fewer bytes cross the link
        r0, r1 = 0, r1 - r0
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="offbatch-kv-writer", daemon=True)
            self._thread.start()
        t0 = time.perf_counter()
        idx = self._free.get()  # waits while every buffer is still being scattered
        self.wait_s += time.perf_counter() - t0
        self._raise()
        bk, bv = self._bufs[idx]
        n = r1 - r0
        event = None
        if k.is_cuda:
            stream = self._streams.get(k.device)
            if stream is None:
                stream = self._streams[k.device] = torch.cuda.Stream(k.device)
            stream.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(stream):
                bk[:n].copy_(k[r0:r1], non_blocking=True)
                bv[:n].copy_(v[r0:r1], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            k.record_stream(stream)  # the compute stream may reuse k/v's memory only after the copy
            v.record_stream(stream)
        else:
            bk[:n].copy_(k[r0:r1])
            bv[:n].copy_(v[r0:r1])
        with self._cond:
            self._submitted[layer] += 1
        self._jobs.put((layer, idx, event, n, dest))

    # ---- waiting ---------------------------------------------------------------------------------
    def settle(self, layer: int) -> None:
        """Return once every write of `layer` submitted so far is in host KV."""
        t0 = time.perf_counter()
        with self._cond:
            while self._done[layer] < self._submitted[layer] and self._error is None:
                self._cond.wait()
        self.wait_s += time.perf_counter() - t0
        self._raise()

    def drain(self) -> None:
        for layer in range(len(self._submitted)):
            self.settle(layer)

    def close(self) -> None:
        """Finish the queued writes and end the thread (a later store starts a new one). The thread holds
        the writer and so the whole host KV: an engine that is done must close it, or its memory stays."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"storing K/V into host memory failed: {self._error}") from self._error

    # ---- the writer thread -------------------------------------------------------------------------
    def _work(self) -> None:
        with torch.inference_mode():  # like the compute thread: no autograd bookkeeping on KV writes
            self._loop()

    def _loop(self) -> None:
        kv = self._kv()  # alive while the thread runs: its owner is generating, or closing this writer
        while True:
            job = self._jobs.get()
            if job is None:
                return
            layer, idx, event, n, (kind, *dest) = job
            try:
                if self._error is None:
                    if event is not None:
                        event.synchronize()
                    bk, bv = self._bufs[idx]
                    if kind == "spans":  # the chunk's spans are consecutive rows from the buffer's start
                        kv.write_spans(layer, bk[:n], bv[:n], [(slot, start, m) for _, slot, start, m in dest[0]])
                    else:
                        slots, pos = dest
                        kv.write_tokens(layer, slots, pos, bk[:n], bv[:n])
                    self.rows_written += n
            except BaseException as e:  # surfaced to the compute thread at its next submit or settle
                self._error = e
            finally:
                self._free.put(idx)
                with self._cond:
                    self._done[layer] += 1
                    self._cond.notify_all()
