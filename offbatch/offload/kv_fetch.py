"""Host KV brought to the device for decode attention, one slot range ahead of the attention.

A step's attention reads, layer after layer, the same list of slot ranges (the micro-batches with a
live sequence). Issued on the compute stream, each copy waits for the compute before it and the compute
after it waits for the copy: when the weights are resident (a compressed model that fits beside the
buffers), the step is then copy + compute instead of the larger of the two. The fetcher issues the copy
of the next (layer, range) on a stream of its own as soon as the current one is taken, into the other of
two buffer pairs; a copy waits only for the attention that last read its buffer. With the CUDA driver's
2D copy only each slot's live positions cross the link (copy2d.py), not its whole max_len range.
"""

from __future__ import annotations

import os

import torch

from offbatch.offload import copy2d


def copy_stream_enabled() -> bool:
    """OFFBATCH_KV_COPY_STREAM=0 copies on the compute stream (the old path, for A/B runs)."""
    return os.environ.get("OFFBATCH_KV_COPY_STREAM", "1") != "0"


class RangeFetcher:
    """Copies of one step's (layer, slot range) items from a host WaveKV to `device`.

    take(layer, r) returns K and V views [b - a, nkv, L, row] of range r = ranges[r] = (a, b, L) of
    `layer`, on the compute stream's terms (it waits for the copy), and starts the next item's copy;
    done() after the attention over them has been issued frees their buffer for the copy after next.
    """

    def __init__(self, kv, ranges: list[tuple[int, int, int]], device: torch.device):
        self.kv, self.ranges, self.device = kv, list(ranges), torch.device(device)
        self.layers = kv.spec.num_layers
        slots = max(b - a for a, b, _ in self.ranges)
        cuda = self.device.type == "cuda" and not kv.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda and copy_stream_enabled() else None
        self.live = cuda and copy2d.available()
        pairs = 2 if self.stream is not None else 1
        self.buffers = [kv.range_buffers(slots, self.device) for _ in range(pairs)]
        self.freed: list[torch.cuda.Event | None] = [None] * pairs  # recorded after the last read of a pair
        if self.stream is not None:
            # The buffers come from the compute stream's pool: a copy into one waits for the compute that
            # used that memory before, and the pool keeps it until the copy stream's work is done.
            start = torch.cuda.Event()
            start.record(torch.cuda.current_stream(self.device))
            self.freed = [start] * pairs
            for pair in self.buffers:
                for t in pair:
                    t.record_stream(self.stream)
        self.pending: dict[tuple[int, int], tuple[int, torch.cuda.Event | None]] = {}
        self.turn = 0  # the pair the next copy goes into
        self.current: int | None = None

    def _issue(self, layer: int, r: int) -> None:
        a, b, L = self.ranges[r]
        i = self.turn
        self.turn = (self.turn + 1) % len(self.buffers)
        self.kv.settle(layer)  # last step's writes of this layer are in host KV
        k_out, v_out = self.buffers[i]
        if self.stream is None:
            self.kv.copy_range_to(layer, a, b, k_out, v_out, L, live=self.live)
            self.pending[(layer, r)] = (i, None)
            return
        with torch.cuda.stream(self.stream):
            if self.freed[i] is not None:
                self.stream.wait_event(self.freed[i])
            self.kv.copy_range_to(layer, a, b, k_out, v_out, L, live=self.live, stream=self.stream)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.pending[(layer, r)] = (i, ready)

    def _next(self, layer: int, r: int) -> tuple[int, int] | None:
        if r + 1 < len(self.ranges):
            return layer, r + 1
        return (layer + 1, 0) if layer + 1 < self.layers else None

    def take(self, layer: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (layer, r) not in self.pending:
            self._issue(layer, r)
        i, ready = self.pending.pop((layer, r))
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        self.current = i
        nxt = self._next(layer, r)
        if self.stream is not None and nxt is not None and nxt not in self.pending:
            self._issue(*nxt)
        L = self.ranges[r][2]
        k_out, v_out = self.buffers[i]
        n = self.ranges[r][1] - self.ranges[r][0]
        return k_out[:n, :, :L], v_out[:n, :, :L]

    def done(self) -> None:
        """The attention over the last taken item has been issued on the compute stream."""
        if self.stream is not None and self.current is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.freed[self.current] = ev
        self.current = None
