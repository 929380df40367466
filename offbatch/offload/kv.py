"""The KV cache of one wave: a fixed number of sequence slots, each with room for its whole context.

Layout per layer: [slots, kv_heads, max_len, head_dim], so one sequence's keys for one head are
contiguous (attention reads them as one stream) and a slot is reused by the next sequence of the wave.
"""

from __future__ import annotations

import torch

from offbatch.models.spec import ModelSpec


class WaveKV:
    def __init__(self, spec: ModelSpec, slots: int, max_len: int, device, dtype, pin: bool = False):
        self.spec, self.slots, self.max_len = spec, slots, max_len
        shape = (slots, spec.num_kv_heads, max_len, spec.head_dim)
        # Zeroed, not empty: masked-out positions still meet V in the product (0 * NaN is NaN).
        self.k = [torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype, pin_memory=pin) for _ in range(spec.num_layers)]
        self.free = list(range(slots - 1, -1, -1))
        # Decode attention's traffic (bench reports it per step): bytes of K/V it read, and of those the
        # bytes copied from host KV to the device first.
        self.read_bytes = 0
        self.copied_bytes = 0
        # Host KV filled from the device: a HostKVWriter (set by the engine) stores new K/V asynchronously.
        self.writer = None

    def drain(self) -> None:
        if self.writer is not None:
            self.writer.drain()

    def settle(self, layer: int) -> None:
        """Wait until every asynchronous write of `layer` is in place (call before reading it)."""
        if self.writer is not None:
            self.writer.settle(layer)

    @staticmethod
    def bytes_per_slot(spec: ModelSpec, max_len: int, dtype_bytes: int) -> int:
        return 2 * spec.num_layers * spec.num_kv_heads * max_len * spec.head_dim * dtype_bytes

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def allocate(self) -> int:
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def write_decode(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """One new token per sequence: k/v [b, nkv, d] at positions pos [b] of slots [b]."""
        self.k[layer][slots, :, pos] = k
        self.v[layer][slots, :, pos] = v

    def write_span(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """A run of tokens of one sequence: k/v [t, nkv, d] at positions start..start+t."""
        t = k.shape[0]
        self.k[layer][slot, :, start : start + t] = k.transpose(0, 1)
        self.v[layer][slot, :, start : start + t] = v.transpose(0, 1)
