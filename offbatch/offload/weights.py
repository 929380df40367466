"""Weight tiers: every module's tensors packed into one flat buffer, resident on the compute device or
held in (pinned) host memory for streaming.

A module (a layer's attention, dense FFN, router, shared expert, one expert; or the embedding / the
output head) is the unit that crosses PCIe: one contiguous host buffer, one copy, then tensor views
into the device buffer it landed in. Modules of one kind have identical layouts in every layer, so a
device slot can hold any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from offbatch.errors import OffbatchError
from offbatch.models.inventory import module_of
from offbatch.models.spec import ModelSpec
from offbatch.offload.disk import ModuleFiles, module_reads, read_into, read_module_now

ALIGN = 256  # bytes; keeps every view aligned for vectorised loads


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


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a module sits in its flat buffer."""

    items: tuple[tuple[str, tuple[int, ...], int], ...]  # (local name, shape, byte offset)
    dtype: torch.dtype
    nbytes: int

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        size = torch.tensor([], dtype=self.dtype).element_size()
        out = {}
        for name, shape, off in self.items:
            n = 1
            for d in shape:
                n *= d
            out[name] = flat[off : off + n * size].view(self.dtype).view(shape)
        return out


def make_layout(named_shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> Layout:
    size = torch.tensor([], dtype=dtype).element_size()
    items, off = [], 0
    for name, shape in sorted(named_shapes):
        n = 1
        for d in shape:
            n *= d
        items.append((name, tuple(shape), off))
        off += -(-n * size // ALIGN) * ALIGN
    return Layout(tuple(items), dtype, off)


# torch's pinned-memory allocator rounds every allocation up to a power of two: a 352 MB expert pinned on
# its own holds 512 MiB. So pinned modules are packed, in key order, into chunks whose sizes are powers
# of two (at most PINNED_CHUNK; smaller ones for what is left over), and the waste is a chunk's tail.
PINNED_CHUNK = 1 << 32


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


def pinned_bytes(sizes: list[int]) -> int:
    """Host bytes that pinning modules of these sizes (in this order) takes."""
    return sum(pack_pinned(sizes)[0])


def module_kind(module: str) -> str:
    """Modules of one kind share a layout and so can share device slots."""
    return "expert" if module.startswith("expert.") else module


ModuleKey = tuple[int, str]  # (layer, module); layer -1 for embed/head


class WeightStore:
    """All weights of the model, module by module, in host memory (pinned when the device is CUDA), except
    the modules of the disk tier (`disk`), which stay in the checkpoint and are read at each use."""

    def __init__(self, source: WeightSource, dtype: torch.dtype, pin: bool, disk: set[ModuleKey] = frozenset()):
        self.spec = source.spec
        self.source = source
        self.dtype = dtype
        groups: dict[ModuleKey, list[tuple[str, str]]] = {}
        for canonical in source.tensor_names():
            layer, module = module_of(canonical, self.spec)
            if layer < 0:  # embed-side tensors vs head-side tensors
                module = "head" if canonical in ("lm_head", "final_norm.weight", "final_norm.bias", "project_out") else "embed"
            local = canonical[len(f"layers.{layer}."):] if layer >= 0 else canonical
            groups.setdefault((layer, module), []).append((local, canonical))
        self.layouts: dict[ModuleKey, Layout] = {}
        self.host: dict[ModuleKey, torch.Tensor] = {}
        self.disk: dict[ModuleKey, list] = {}  # module -> its TensorReads (offload/disk.py)
        unknown = set(disk) - set(groups)
        if unknown:
            raise OffbatchError(f"the disk tier names modules this model does not have, e.g. {sorted(unknown)[0]}")
        for key, members in sorted(groups.items()):
            self.layouts[key] = make_layout([(local, source.tensor_shape(c)) for local, c in members], dtype)
        # The embedding is looked up on the host and never copied whole: it needs no pinning.
        host_keys = [k for k in sorted(groups) if k not in disk]
        pinned_keys = [k for k in host_keys if pin and k[1] != "embed"]
        sizes, place = pack_pinned([self.layouts[k].nbytes for k in pinned_keys])
        self.chunks = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes]
        flats = {k: self.chunks[c][off : off + self.layouts[k].nbytes] for k, (c, off) in zip(pinned_keys, place)}
        for k in host_keys:
            if k not in flats:
                flats[k] = torch.empty(self.layouts[k].nbytes, dtype=torch.uint8)
        # From a model folder, modules are read with positioned reads straight into their buffers: the
        # file's pages then sit in the page cache, not in this process's memory (a memory map would put
        # every page of the checkpoint into its resident set, on top of the pinned copies).
        files = ModuleFiles() if getattr(source, "ckpt", None) is not None else None
        try:
            for key, members in sorted(groups.items()):
                layout = self.layouts[key]
                if key in disk:
                    if key[1] == "embed":
                        raise OffbatchError("the embedding is looked up on the host: it cannot be in the disk tier")
                    self.disk[key] = module_reads(source, layout, members, dtype)
                    continue
                flat = flats[key]
                if files is not None:
                    read_into(module_reads(source, layout, members, dtype), layout, source, flat, files)
                else:
                    views = layout.views(flat)
                    for local, canonical in members:
                        views[local].copy_(source.get(canonical))
                self.host[key] = flat
        finally:
            if files is not None:
                files.close()

    def nbytes(self, key: ModuleKey) -> int:
        return self.layouts[key].nbytes

    def host_views(self, key: ModuleKey) -> dict[str, torch.Tensor]:
        """Host tensors of a module (a disk-tier module is read into a fresh buffer)."""
        if key in self.disk:
            return self.layouts[key].views(read_module_now(self, key))
        return self.layouts[key].views(self.host[key])

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
