"""Weight tiers: every module's tensors packed into one flat buffer, resident on the compute device or
held in (pinned) host memory for streaming.

A module (models/catalogue.py: a layer's attention, dense FFN, router, shared expert, one expert; or
the embedding / the output head) is the unit that crosses PCIe: one contiguous host buffer, one copy,
then views of the device buffer it landed in. How a module's tensors become bytes is its weight
format's (offbatch/formats): the store asks the format for the layout and to encode each tensor, and
hands out a module's views as the format's `ModuleWeights`. Modules of one kind have identical layouts
in every layer, so a device slot can hold any of them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from offbatch.errors import OffbatchError
from offbatch.formats import DENSE, Layout, ModuleWeights, WeightFormat
from offbatch.models.catalogue import ModuleKey, Part, modules_of
from offbatch.models.spec import ModelSpec
from offbatch.offload.disk import ModuleFiles, clip_reads, module_reads, read_module_now, read_raw


class WeightSource(Protocol):
    """Where weights come from: a Checkpoint, or synthetic weights generated on demand."""

    spec: ModelSpec

    def tensor_names(self) -> list[str]: ...  # canonical names

    def tensor_shape(self, canonical: str) -> tuple[int, ...]: ...

    def get(self, canonical: str) -> torch.Tensor: ...


class CheckpointSource:
    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.spec = ckpt.spec

    def tensor_names(self) -> list[str]:
        names = list(self.ckpt.entries)
        if self.ckpt.tied:
            names.append("lm_head")
        return names

    def tensor_shape(self, canonical: str) -> tuple[int, ...]:
        return self.ckpt.entry(canonical).shape

    def get(self, canonical: str) -> torch.Tensor:
        return self.ckpt.get(canonical)

    def stored(self, canonical: str, fmt: WeightFormat) -> dict[str, torch.Tensor] | None:
        """The tensor's stored tensors by suffix, when the folder holds it in `fmt` already (a converted
        folder read in its own format): copied as they are, never decoded and encoded again."""
        if self.ckpt.format.name != fmt.name or not self.ckpt.entry(canonical).stored:
            return None
        return self.ckpt.get_stored(canonical)


def stored_in(source: WeightSource, canonical: str, fmt: WeightFormat) -> dict[str, torch.Tensor] | None:
    """A source's tensor as `fmt`'s stored tensors, where the source holds it so (else None)."""
    stored = getattr(source, "stored", None)
    return None if stored is None else stored(canonical, fmt)


# torch's pinned-memory allocator rounds every allocation up to a power of two: a 352 MB expert pinned on
# its own holds 512 MiB. So pinned modules are packed, in key order, into chunks whose sizes are powers
# of two (at most PINNED_CHUNK; smaller ones for what is left over), and the waste is a chunk's tail.
PINNED_CHUNK = 1 << 32
LOAD_THREADS = 4  # modules read at once when a model folder is loaded into host memory


def pack_pinned(sizes: list[int]) -> tuple[list[int], list[tuple[int, int] | None]]:
    """(chunk sizes, (chunk, byte offset) per module) for modules of these sizes, first fit in order."""
    place: list[tuple[int, int] | None] = [None] * len(sizes)
    chunks: list[int] = []
    rest = [i for i, n in enumerate(sizes) if n > 0]
    while rest:
        remaining = sum(sizes[i] for i in rest)
        chunk = min(PINNED_CHUNK, 1 << (remaining.bit_length() - 1))  # the largest power of two it fills
        chunk = max(chunk, 1 << (sizes[rest[0]] - 1).bit_length())  # one that holds the next module
        off, left = 0, []
        for i in rest:
            if off + sizes[i] <= chunk:
                place[i] = (len(chunks), off)
                off += sizes[i]
            else:
                left.append(i)
        chunks.append(chunk)
        rest = left
    return chunks, place


def release_pinned_cache() -> None:
    """Give freed pinned blocks back to the OS: torch's pinned allocator keeps them for reuse, so a process
    that runs engines one after another (a grid of plans) would otherwise hold every size it ever pinned."""
    release = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    release = release or getattr(torch._C, "_host_emptyCache", None)
    if release is not None and torch.cuda.is_available():
        release()


def pinned_chunks(sizes: list[int], place: list, nbytes: list[int]) -> list[torch.Tensor]:
    """The pinned chunks pack_pinned laid out (zeroed): registered in place, each only as large as what it
    holds (offload/pinned.py), or from torch's allocator at its power-of-two sizes (OFFBATCH_PIN_REGISTER=0)."""
    from offbatch.offload.pinned import pinned_zeros, registering

    if not registering():
        return [torch.zeros(n, dtype=torch.uint8, pin_memory=True) for n in sizes]
    used = [0] * len(sizes)
    for p, n in zip(place, nbytes):
        if p is not None:
            used[p[0]] = max(used[p[0]], p[1] + n)
    return [pinned_zeros(n) for n in used]


def pinned_bytes(sizes: list[int]) -> int:
    """Host bytes that pinning modules of these sizes (in this order) takes."""
    return sum(pack_pinned(sizes)[0])


def module_layout(fmt: WeightFormat, parts: list[Part], shape_of: Callable[[str], tuple[int, ...]],
                  dtype: torch.dtype) -> Layout:
    """A module's layout in a format: its parts (row slices cut to their rows) laid out by the format's
    packing. The store packs with it and the planner sizes modules with it, so they cannot disagree."""
    return fmt.layout([(p.local, p.shape(shape_of(p.canonical))) for p in parts], dtype)


class WeightStore:
    """All weights of the model, module by module, in host memory (pinned when the device is CUDA), except
    the modules of the disk tier (`disk`), which stay in the checkpoint and are read at each use.

    `fmt` stores the weights; `modules` is the model's module catalogue (default: every tensor of the
    source grouped by models/catalogue.modules_of).

    `shard` (a rank of a split weight stream, offload/shard_group.py): n -> the byte range [lo, hi) of an
    n-byte module this rank copies over its link. The store then holds only that range of every module
    but the embedding (the ranks of one host hold the model once between them, and each reads only its
    share from the folder), and a module's norms apart (post-norm layers read them after release)."""

    def __init__(self, source: WeightSource, dtype: torch.dtype, pin: bool, disk: set[ModuleKey] = frozenset(),
                 fmt: WeightFormat = DENSE, modules: dict[ModuleKey, list[Part]] | None = None,
                 encode_on: torch.device | str = "cpu", shard=None):
        """encode_on: where the format encodes tensors at load (the GPU, when there is one: quantizing a
        large model on the host takes minutes; the same arithmetic, in float32, gives the same bytes)."""
        self.spec = source.spec
        self.source = source
        self.dtype = dtype
        self.format = fmt
        self.encode_on = torch.device(encode_on) if fmt.encodes_anywhere else torch.device("cpu")
        self.modules = dict(modules) if modules is not None else modules_of(source.tensor_names(), self.spec)
        self.layouts: dict[ModuleKey, Layout] = {
            key: module_layout(fmt, parts, source.tensor_shape, dtype) for key, parts in sorted(self.modules.items())}
        self.host: dict[ModuleKey, torch.Tensor] = {}
        self.disk: dict[ModuleKey, list] = {}  # module -> its TensorReads (offload/disk.py)
        # A rank's share: module -> the byte range of it that host[module] holds (others: all of it).
        self.ranges: dict[ModuleKey, tuple[int, int]] = {}
        self._norms: dict[ModuleKey, dict[str, torch.Tensor]] = {}
        if shard is not None:
            if disk:
                raise OffbatchError("a rank of a split weight stream holds every weight it streams in host memory: "
                                    "no disk tier")
            self.ranges = {k: shard(self.layouts[k].nbytes) for k in self.layouts if k[1] != "embed"}
        unknown = set(disk) - set(self.layouts)
        if unknown:
            raise OffbatchError(f"the disk tier names modules this model does not have, e.g. {sorted(unknown)[0]}")
        if (-1, "embed") in disk:
            raise OffbatchError("the embedding is looked up on the host: it cannot be in the disk tier")
        t0 = time.perf_counter()
        self.chunks, flats = self._host_buffers([k for k in self.layouts if k not in disk], pin)
        self.load_stats = {"alloc_s": time.perf_counter() - t0}
        # From a model folder, modules are read with positioned reads straight into their buffers: the
        # file's pages then sit in the page cache, not in this process's memory (a memory map would put
        # every page of the checkpoint into its resident set, on top of the pinned copies). Buffered, not
        # O_DIRECT (the disk tier's reads are): a model read before loads from the page cache, and two
        # workers of one host loading one folder read the disk once. LOAD_THREADS modules at a time: one
        # reader at queue depth one got a third of the disk's rate and a fifth of the page cache's.
        t0 = time.perf_counter()
        ckpt = getattr(source, "ckpt", None) is not None
        reads = {}
        for key, layout in self.layouts.items():
            if key in disk:
                self.disk[key] = module_reads(source, layout, self.modules[key], dtype, fmt)
            elif ckpt:
                reads[key] = module_reads(source, layout, self.modules[key], dtype, fmt)
                if key in self.ranges:
                    reads[key] = clip_reads(reads[key], *self.ranges[key])
        if reads:
            local = threading.local()
            opened: list[ModuleFiles] = []

            def load(key):
                files = getattr(local, "files", None)
                if files is None:
                    files = local.files = ModuleFiles(direct=False)
                    opened.append(files)
                read_raw(reads[key], flats[key], files)

            try:
                with ThreadPoolExecutor(min(LOAD_THREADS, len(reads)), thread_name_prefix="offbatch-load") as pool:
                    list(pool.map(load, reads))
            finally:
                for files in opened:
                    files.close()
        self.load_stats["read_s"] = time.perf_counter() - t0
        for key in self.layouts:
            if key in disk:
                continue
            flat = flats[key]
            if key in self.ranges:
                self._fill_share(key, flat, reads.get(key))
            elif key in reads:
                rest = [r.part for r in reads[key] if not r.direct]  # what the format converts: on this thread
                if rest:
                    self.fill(key, rest, flat)
            else:
                self.fill(key, self.modules[key], flat)
            self.host[key] = flat
        self.load_stats["total_s"] = time.perf_counter() - t0 + self.load_stats["alloc_s"]
        self.load_stats["bytes"] = sum(f.numel() for f in flats.values())

    def _held(self, key: ModuleKey) -> int:
        """Bytes the store holds of a module (a rank's share, or all of it)."""
        lo, hi = self.ranges.get(key, (0, self.layouts[key].nbytes))
        return max(0, hi - lo)

    def _host_buffers(self, keys: list[ModuleKey], pin: bool) -> tuple[list[torch.Tensor], dict[ModuleKey, torch.Tensor]]:
        """(pinned chunks, a buffer per module): the embedding is looked up on the host and never copied
        whole, so it needs no pinning."""
        pinned_keys = [k for k in keys if pin and k[1] != "embed" and self._held(k)]
        sizes, place = pack_pinned([self._held(k) for k in pinned_keys])
        chunks = pinned_chunks(sizes, place, [self._held(k) for k in pinned_keys])
        flats = {k: chunks[c][off : off + self._held(k)] for k, (c, off) in zip(pinned_keys, place)}
        for k in keys:
            if k not in flats:
                flats[k] = torch.empty(self._held(k), dtype=torch.uint8)
        return chunks, flats

    def _fill_share(self, key: ModuleKey, share: torch.Tensor, reads) -> None:
        """A rank's range of a module: read straight into it where every tensor is read as it is (the reads
        were clipped to the range), else the whole module built in a scratch buffer and the range copied.
        The module's norms are kept whole beside it."""
        lo, hi = self.ranges[key]
        parts = self.modules[key]
        whole = None if reads is None else module_reads(self.source, self.layouts[key], parts, self.dtype, self.format)
        if whole is not None and all(r.direct for r in whole):
            scratch = None  # the clipped reads filled the share
        else:
            scratch = torch.empty(self.layouts[key].nbytes, dtype=torch.uint8)
            if whole is not None:
                files = ModuleFiles(direct=False)
                try:
                    read_raw(whole, scratch, files)
                finally:
                    files.close()
                parts = [r.part for r in whole if not r.direct]
            self.fill(key, parts, scratch)
            if hi > lo:
                share.copy_(scratch[lo:hi])
        norm_parts = [p for p in self.modules[key] if "norm" in p.local]
        if norm_parts:
            if scratch is None:
                scratch = torch.zeros(self.layouts[key].nbytes, dtype=torch.uint8)
                self.fill(key, norm_parts, scratch)
            self._norms[key] = {k: t.clone() for k, t in self.views(key, scratch).items() if "norm" in k}

    def host_share(self, key: ModuleKey, lo: int, hi: int) -> torch.Tensor:
        """Host bytes [lo, hi) of a module (a rank's store holds only its own range of it)."""
        if key in self.ranges:
            if (lo, hi) != self.ranges[key]:
                raise ValueError(f"module {key}: this store holds bytes {self.ranges[key]}, not {(lo, hi)}")
            return self.host[key]
        return self.host[key][lo:hi]

    def norms(self, key: ModuleKey) -> dict[str, torch.Tensor]:
        """A module's norm tensors, on the host."""
        if key in self.ranges:
            return self._norms.get(key, {})
        return {k: t for k, t in self.host_views(key).items() if "norm" in k}

    def fill(self, key: ModuleKey, parts: list[Part], flat: torch.Tensor) -> None:
        """Write these parts of a module into its buffer (host, uint8) from the source: copied (and
        converted to the compute dtype) where the format stores a tensor as it is, else encoded."""
        views = self.layouts[key].views(flat)
        for part in parts:
            held = stored_in(self.source, part.canonical, self.format)
            if held is not None:  # row-wise formats: a row slice of a weight is a row slice of each stored tensor
                for suffix, t in held.items():
                    views[part.local + suffix].copy_(t if part.rows is None else t[part.rows[0] : part.rows[1]])
                continue
            t = self.source.get(part.canonical)
            if part.rows is not None:
                t = t[part.rows[0] : part.rows[1]]
            if self.format.unchanged(part.local, tuple(t.shape), self.dtype):
                views[part.local].copy_(t)
                continue
            for name, stored in self.format.encode(part.local, t.to(self.encode_on), self.dtype).items():
                views[name].copy_(stored)

    def views(self, key: ModuleKey, flat: torch.Tensor) -> ModuleWeights:
        """A module's weights over a buffer (host or device, uint8) holding its bytes."""
        return self.format.weights(self.layouts[key].views(flat))

    def nbytes(self, key: ModuleKey) -> int:
        return self.layouts[key].nbytes

    def host_views(self, key: ModuleKey) -> ModuleWeights:
        """Host tensors of a module (a disk-tier module is read into a fresh buffer)."""
        if key in self.ranges:
            raise ValueError(f"module {key}: this rank's store holds only its share of the module's bytes")
        if key in self.disk:
            return self.views(key, read_module_now(self, key))
        return self.views(key, self.host[key])

    def host_bytes(self) -> int:
        """Bytes the host tier holds (pinned chunks, or the modules' own buffers)."""
        unpinned = sum(f.numel() for k, f in self.host.items() if not (self.chunks and k[1] != "embed"))
        return sum(c.numel() for c in self.chunks) + unpinned

    def keys(self) -> list[ModuleKey]:
        return list(self.layouts)

    @property
    def total_bytes(self) -> int:
        return sum(layout.nbytes for layout in self.layouts.values())


class SynthSource:
    """Random weights generated tensor by tensor (offbatch synth's generator), for benchmarks at real
    shapes without writing the model to disk first."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        from offbatch.models.names import expected_tensors

        self.spec, self.seed = spec, seed
        self.infos = {info.canonical: (name, info) for name, info in expected_tensors(spec).items()}

    def tensor_names(self) -> list[str]:
        return list(self.infos)

    def tensor_shape(self, canonical: str) -> tuple[int, ...]:
        return self.infos[canonical][1].shape

    def get(self, canonical: str) -> torch.Tensor:
        from offbatch.tools.synth import synth_tensor

        name, info = self.infos[canonical]
        return synth_tensor(self.spec, name, self.seed)
