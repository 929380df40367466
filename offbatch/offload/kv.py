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

from offbatch import kernels
from offbatch.formats.base import dtype_bytes
from offbatch.kernels import kv_reference
from offbatch.models.spec import ModelSpec
from offbatch.offload import copy2d
from offbatch.offload.weights import pack_pinned, pinned_bytes, pinned_chunks


# ---- KV formats --------------------------------------------------------------------------------------
class KVFormat:
    """How the K and V of one token are stored (one layer: one row of K and one of V)."""

    name = "base"
    lossy = False  # a lossy format is used only where the user asks for it (its quality: eval-ppl --kv)

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


class PackedKV(KVFormat):
    """K and V quantized once when written: asymmetric integer codes in groups along the head dimension,
    a float16 scale and minimum per group, one packed uint8 row per token and KV head (the layout and
    its arithmetic: kernels/kv_reference.py). Lossy: its quality is measured (`eval-ppl --kv`)."""

    bits = 8
    nominal_group = 64
    lossy = True

    def group_of(self, head_dim: int) -> int:
        """The group size for this head dimension: the nominal one, or the largest even divisor below it."""
        g = min(self.nominal_group, head_dim)
        while head_dim % g or g % 2:
            g -= 1
        return g

    def row_bytes(self, spec: ModelSpec) -> int:
        return spec.num_kv_heads * self.head_row_bytes(spec.head_dim)

    def head_row_bytes(self, head_dim: int) -> int:
        return kv_reference.row_bytes(head_dim, self.bits, self.group_of(head_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., head_dim] -> packed rows uint8 [..., head_row_bytes] (on x's device): the Triton kernel on a
        GPU, its twin on a CPU (the kernels' dispatch would take the Triton interpreter wherever
        TRITON_INTERPRET is set, as in the test suite)."""
        encode = kernels.kv_encode if x.is_cuda else kv_reference.kv_encode
        return encode(x, self.bits, self.group_of(x.shape[-1]))

    def decode(self, packed: torch.Tensor, head_dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Packed rows [..., head_row_bytes] -> values [..., head_dim] in `dtype` (default: the compute dtype)."""
        return kv_reference.kv_decode(packed, head_dim, self.bits, self.group_of(head_dim), dtype or self.dtype)


class Int8KV(PackedKV):
    name = "int8"
    bits = 8
    nominal_group = 64


class Int4KV(PackedKV):
    name = "int4"
    bits = 4
    nominal_group = 32


KV_FORMATS: dict[str, type[KVFormat]] = {}
KV_ALIASES = {"bf16": "dense", "fp16": "dense", "float16": "dense", "bfloat16": "dense", "none": "dense"}


def register_kv_format(cls: type[KVFormat]) -> type[KVFormat]:
    KV_FORMATS[cls.name] = cls
    return cls


register_kv_format(DenseKV)
register_kv_format(Int8KV)
register_kv_format(Int4KV)


KV_GROUPS = (8, 16, 32, 64, 128)  # group sizes a packed format takes by name: int4-g16, int8-g32, ...


def kv_format_name(name: str) -> str:
    """The registered name a user's word stands for ("bf16" is the dense format; "int4-g16" is int4 in
    groups of 16); unknown: a KeyError."""
    key = KV_ALIASES.get(name.strip().lower(), name.strip().lower())
    base, _, group = key.partition("-g")
    if base in KV_FORMATS and issubclass(KV_FORMATS[base], PackedKV) and group:
        if group.isdigit() and int(group) in KV_GROUPS:
            return key if int(group) != KV_FORMATS[base].nominal_group else base
        raise KeyError(f"KV format {name!r}: groups of {', '.join(map(str, KV_GROUPS))} values ({base}-g16, ...)")
    if key not in KV_FORMATS:
        raise KeyError(f"unknown KV format {name!r} (known: {', '.join(kv_format_names())}, with -gN for other "
                       "groups; bf16 = dense)")
    return key


def kv_format_names() -> list[str]:
    return sorted(KV_FORMATS, key=lambda n: (n != "dense", n))


@functools.lru_cache(maxsize=64)
def kv_format(name: str, dtype: torch.dtype) -> KVFormat:
    """The KV format `name` (a plan's kv_format) computing in `dtype`."""
    key = kv_format_name(name)
    base, _, group = key.partition("-g")
    fmt = KV_FORMATS[base](dtype)
    if group:  # a packed format in other groups along the head dimension
        fmt.nominal_group, fmt.name = int(group), key
    return fmt


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
        if self.format.dtype != dtype:
            raise ValueError(f"KV format {self.format.name} computes in {self.format.dtype}, the store in {dtype}")
        self.device, self.dtype = torch.device(device), dtype
        self.packed = isinstance(self.format, PackedKV)
        self.row_bytes = self.format.row_bytes(spec)  # K of one position of one slot in one layer
        # Dense: values in the compute dtype; packed: one uint8 row of codes and group parameters per head.
        self.store_dtype = torch.uint8 if self.packed else dtype
        self.row_width = self.format.head_row_bytes(spec.head_dim) if self.packed else spec.head_dim
        if self.packed:
            self.bits, self.group = self.format.bits, self.format.group_of(spec.head_dim)
        shape = (slots, spec.num_kv_heads, max_len, self.row_width)
        dtype = self.store_dtype
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
        if pin:
            chunks = pinned_chunks(sizes, place, [per] * count)
        else:
            chunks = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
        return [chunks[c][off : off + per].view(dtype).view(shape) for c, off in place]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def row_shape(self) -> tuple[int, int]:
        """K (or V) of one token of one layer as stored: [kv_heads, head_dim] values (dense) or
        [kv_heads, packed row bytes]."""
        return self.spec.num_kv_heads, self.row_width

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """K or V rows [..., head_dim] as this store keeps them (packed where the format is; on x's device,
        so a GPU quantizes what it computed before the bytes cross the link)."""
        if not self.packed or x.dtype == torch.uint8:
            return x
        return self.format.encode(x)

    def decode(self, stored: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Stored rows (a read's views) as values [..., head_dim] in `dtype` (default: the compute dtype)."""
        if not self.packed:
            return stored if dtype is None else stored.to(dtype)
        return self.format.decode(stored, self.spec.head_dim, dtype or self.dtype)

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
        self.k[layer][slots, :, pos] = self.encode(k).to(self.device)
        self.v[layer][slots, :, pos] = self.encode(v).to(self.device)

    def write_spans(self, layer: int, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int, int]]):
        """Runs of tokens: k/v [T, nkv, d] (any device), the rows of span (slot, start, n) consecutive in
        spans' order, go to positions start..start+n of slot."""
        k, v = self.encode(k).to(self.device), self.encode(v).to(self.device)
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
        """K and V of slots a..b, positions 0..length as stored: views [b - a, nkv, length, row_width], no
        copy (packed rows for a packed format: `decode` or a kernel that reads them)."""
        self.read_bytes += 2 * (b - a) * length * self.row_bytes
        return self.k[layer][a:b, :, :length], self.v[layer][a:b, :, :length]

    def range_buffers(self, slots: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Uninitialised K and V buffers for `slots` whole slots on `device` (for copy_range_to)."""
        shape = (slots,) + tuple(self.k[0].shape[1:])
        return (torch.empty(shape, dtype=self.store_dtype, device=device),
                torch.empty(shape, dtype=self.store_dtype, device=device))

    def copy_range_to(self, layer: int, a: int, b: int, k_out: torch.Tensor, v_out: torch.Tensor,
                      length: int, live: bool = False, stream=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy slots a..b (non-blocking from pinned memory) into the first b - a slots of k_out/v_out
        (range_buffers); returns those narrowed to `length`. Whole slots (one contiguous block each of K
        and V), or with `live` only positions 0..length of each (one 2D copy each: copy2d.py), on
        `stream` (default: the current one)."""
        self.read_bytes += 2 * (b - a) * length * self.row_bytes
        k_dst, v_dst = k_out[: b - a], v_out[: b - a]
        if live:
            self.copied_bytes += 2 * (b - a) * length * self.row_bytes
            copy2d.copy_prefix(k_dst, self.k[layer][a:b], length, stream)
            copy2d.copy_prefix(v_dst, self.v[layer][a:b], length, stream)
        else:
            self.copied_bytes += 2 * (b - a) * self.max_len * self.row_bytes
            k_dst.copy_(self.k[layer][a:b], non_blocking=True)
            v_dst.copy_(self.v[layer][a:b], non_blocking=True)
        return k_dst[:, :, :length], v_dst[:, :, :length]
