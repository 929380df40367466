"""The KV cache of one wave: a fixed number of sequence slots, each with room for its whole context.

Layout per layer: [slots, kv_heads, max_len, head_dim], so one sequence's keys for one head are
contiguous (attention reads them as one stream) and a slot is reused by the next sequence of the wave.
"""

from __future__ import annotations

import torch

from offbatch.models.spec import ModelSpec
from offbatch.offload.weights import pack_pinned


class WaveKV:
    def __init__(self, spec: ModelSpec, slots: int, max_len: int, device, dtype, pin: bool = False):
        self.spec, self.slots, self.max_len = spec, slots, max_len
        shape = (slots, spec.num_kv_heads, max_len, spec.head_dim)
        # Zeroed, not empty: masked-out positions still meet V in the product (0 * NaN is NaN).
        if pin:
            tensors = self._pinned_tensors(shape, 2 * spec.num_layers, dtype)
            self.k, self.v = tensors[: spec.num_layers], tensors[spec.num_layers :]
        else:
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.free = list(range(slots - 1, -1, -1))
        # Decode attention's traffic (bench reports it per step): bytes of K/V it read, and of those the
        # bytes copied from host KV to the device first.
        self.read_bytes = 0
        self.copied_bytes = 0
        # Host KV filled from the device: a HostKVWriter (set by the engine) stores new K/V asynchronously.
        self.writer = None

    @staticmethod
    def _pinned_tensors(shape: tuple[int, ...], count: int, dtype, pin: bool = True) -> list[torch.Tensor]:
        """`count` zeroed pinned tensors of `shape`, packed into power-of-two chunks: the pinned allocator
        rounds each allocation up to a power of two, so a 671 MB layer of K alone would hold 1 GiB (a
        1024-sequence Llama-3-8B wave's 40 GiB of host KV would take 64 GiB)."""
        per = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        sizes, place = pack_pinned([per] * count)
        chunks = [torch.zeros(n, dtype=torch.uint8, pin_memory=pin) for n in sizes]
        return [chunks[c][off : off + per].view(dtype).view(shape) for c, off in place]

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
