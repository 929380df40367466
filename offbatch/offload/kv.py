"""The KV store of one wave, and the KV formats that say how its K and V are stored.

A KV format holds THE bytes rule of the KV cache: everything that counts KV bytes (the planner's memory
and step-time terms, the plan checks, `inspect`, the host writer's staging ring) asks a format, so a
new format (int8 KV, ...) is one subclass and a `register_kv_format`. `dense` stores K and V as
computed, in the compute dtype.

WaveKV: a fixed number of sequence slots, each with room for its whole context. Layout per layer:
[slots, kv_heads, max_len, head_dim], so one sequence's keys for one head are contiguous (attention
reads them as one stream) and a slot is reused by the next sequence of the wave. Readers and writers
(attention, the host writer) go through its methods; nothing outside this file indexes its tensors.
"""

from __future__ import annotations

import functools

import torch

from offbatch.formats.base import dtype_bytes
from offbatch.models.spec import ModelSpec
from offbatch.offload.weights import pack_pinned, pinned_bytes


# ---- KV formats --------------------------------------------------------------------------------------
class KVFormat:
    """How the K and V of one token are stored (one layer: one row of K and one of V)."""

    name = "base"

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype  # the compute dtype

    def row_bytes(self, spec: ModelSpec) -> int:
        """K (or V) of one position of one sequence in one layer."""
        raise NotImplementedError

    def layer_bytes_per_token(self, spec: ModelSpec) -> int:
        """K and V of one position in one layer."""
        return 2 * self.row_bytes(spec)

    def bytes_per_token(self, spec: ModelSpec) -> int:
        """K and V of one position, all layers."""
        return spec.num_layers * self.layer_bytes_per_token(spec)

    def slot_bytes(self, spec: ModelSpec, max_len: int) -> int:
        """One sequence's KV: every layer, room for `max_len` positions."""
        return self.bytes_per_token(spec) * max_len

    def tensor_bytes(self, spec: ModelSpec, slots: int, max_len: int) -> int:
        """One layer's K (or V) of `slots` sequences."""
        return slots * max_len * self.row_bytes(spec)

    def store_bytes(self, spec: ModelSpec, slots: int, max_len: int, pinned: bool) -> int:
        """Memory of a whole WaveKV: 2 x layers tensors, packed into power-of-two chunks when pinned."""
        per_tensor = self.tensor_bytes(spec, slots, max_len)
        return _packed_equal(per_tensor, 2 * spec.num_layers) if pinned else 2 * spec.num_layers * per_tensor


class DenseKV(KVFormat):
    """K and V as computed, in the compute dtype."""

    name = "dense"

    def row_bytes(self, spec: ModelSpec) -> int:
        return spec.num_kv_heads * spec.head_dim * dtype_bytes(self.dtype)


KV_FORMATS: dict[str, type[KVFormat]] = {}


def register_kv_format(cls: type[KVFormat]) -> type[KVFormat]:
    KV_FORMATS[cls.name] = cls
    return cls


register_kv_format(DenseKV)


@functools.lru_cache(maxsize=64)
def kv_format(name: str, dtype: torch.dtype) -> KVFormat:
    """The KV format `name` (a plan's kv_format) computing in `dtype`."""
    if name not in KV_FORMATS:
        raise KeyError(f"unknown KV format {name!r} (known: {', '.join(sorted(KV_FORMATS))})")
    return KV_FORMATS[name](dtype)


@functools.lru_cache(maxsize=4096)
def _packed_equal(size: int, count: int) -> int:
    """pinned_bytes of `count` tensors of one size (the solver asks for the same few often)."""
    return pinned_bytes([size] * count)


def pinned_allocation_bytes(n: int) -> int:
    """Host bytes one pinned allocation of n bytes takes (the allocator rounds to a power of two)."""
    return _packed_equal(n, 1)


# ---- the store -----------------------------------------------------------------------------------------
class WaveKV:
    def __init__(self, spec: ModelSpec, slots: int, max_len: int, device, dtype, pin: bool = False,
                 fmt: KVFormat | None = None):
        self.spec, self.slots, self.max_len = spec, slots, max_len
        self.format = fmt or kv_format("dense", dtype)
        if self.format.dtype != dtype or not isinstance(self.format, DenseKV):
            raise ValueError(f"WaveKV stores the dense KV format in the compute dtype, not {self.format.name}")
        self.device, self.dtype = torch.device(device), dtype
        self.row_bytes = self.format.row_bytes(spec)  # K of one position of one slot in one layer
        shape = (slots, spec.num_kv_heads, max_len, spec.head_dim)
        # Zeroed, not empty: masked-out positions still meet V in the product (0 * NaN is NaN).
        if pin:
            tensors = self._pinned_tensors(shape, 2 * spec.num_layers, dtype)
            self.k, self.v = tensors[: spec.num_layers], tensors[spec.num_layers :]
        else:
            self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
            self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(spec.num_layers)]
        self.pinned = pin
        self._free = list(range(slots - 1, -1, -1))
        # Decode attention's traffic (bench reports it per step): bytes of K/V it read, and of those the
        # bytes copied from host KV to the device first.
        self.read_bytes = 0
        self.copied_bytes = 0
        # Host KV filled from the device: a HostKVWriter (set by its owner) stores new K/V asynchronously.
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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def row_shape(self) -> tuple[int, int]:
        """K (or V) of one token of one layer: [kv_heads, head_dim]."""
        return self.spec.num_kv_heads, self.spec.head_dim

    # ---- slots -------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        """Slots free for a new sequence."""
        return len(self._free)

    def allocate(self) -> int:
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    # ---- writes ------------------------------------------------------------------------------------
    def write_tokens(self, layer: int, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """One new token per sequence: k/v [b, nkv, d] (any device) at positions pos [b] of slots [b]
        (index tensors on the store's device)."""
        self.k[layer][slots, :, pos] = k.to(self.device)
        self.v[layer][slots, :, pos] = v.to(self.device)

    def write_spans(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int, int]]):
        """Runs of tokens: k/v [T, nkv, d] (any device), the rows of span (slot, start, n) consecutive in
        spans' order, go to positions start..start+n of slot."""
        k, v = k.to(self.device), v.to(self.device)
        row = 0
        for slot, start, n in spans:
            self.k[layer][slot, :, start : start + n] = k[row : row + n].transpose(0, 1)
            self.v[layer][slot, :, start : start + n] = v[row : row + n].transpose(0, 1)
            row += n

    def settle(self, layer: int) -> None:
        """Wait until every asynchronous write of `layer` is in place (call before reading it)."""
        if self.writer is not None:
            self.writer.settle(layer)

    def drain(self) -> None:
        if self.writer is not None:
            self.writer.drain()

    def close(self) -> None:
        """End the writer's thread (it holds the whole store); a later write starts a new one."""
        if self.writer is not None:
            self.writer.close()

    # ---- reads -------------------------------------------------------------------------------------
    def read(self, layer: int, a: int, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of slots a..b, positions 0..length: views [b - a, nkv, length, d], no copy."""
        self.read_bytes += 2 * (b - a) * length * self.row_bytes
        return self.k[layer][a:b, :, :length], self.v[layer][a:b, :, :length]

    def range_buffers(self, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised K and V buffers for `slots` whole slots on `device` (for copy_range_to)."""
        shape = (slots,) + tuple(self.k[0].shape[1:])
        return (torch.empty(shape, dtype=self.dtype, device=device),
                torch.empty(shape, dtype=self.dtype, device=device))

    def copy_range_to(self, layer: int, a: int, b: int, k_out: torch.Tensor, v_out: torch.Tensor,
                      length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy slots a..b whole (one contiguous block each of K and V, non-blocking from pinned memory)
        into the first b - a slots of k_out/v_out (range_buffers); returns those narrowed to `length`."""
        self.read_bytes += 2 * (b - a) * length * self.row_bytes
        self.copied_bytes += 2 * (b - a) * self.max_len * self.row_bytes
        kk = k_out[: b - a].copy_(self.k[layer][a:b], non_blocking=True)[:, :, :length]
        vv = v_out[: b - a].copy_(self.v[layer][a:b], non_blocking=True)[:, :, :length]
        return kk, vv
