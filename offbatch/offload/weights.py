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
        for key, members in groups.items():
            layout = make_layout([(local, source.tensor_shape(c)) for local, c in members], dtype)
            if key in disk:
                if key[1] == "embed":
                    raise OffbatchError("the embedding is looked up on the host: it cannot be in the disk tier")
                from offbatch.offload.disk import module_reads

                self.layouts[key] = layout
                self.disk[key] = module_reads(source, layout, members, dtype)
                continue
            flat = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
            views = layout.views(flat)
            for local, canonical in members:
                views[local].copy_(source.get(canonical))
            self.layouts[key] = layout
            self.host[key] = flat

    def nbytes(self, key: ModuleKey) -> int:
        return self.layouts[key].nbytes

    def host_views(self, key: ModuleKey) -> dict[str, torch.Tensor]:
        """Host tensors of a module (a disk-tier module is read into a fresh buffer)."""
        if key in self.disk:
            from offbatch.offload.disk import read_module_now

            return self.layouts[key].views(read_module_now(self, key))
        return self.layouts[key].views(self.host[key])

    def host_bytes(self) -> int:
        """Bytes of the host tier (what the disk tier saves is the rest of total_bytes)."""
        return sum(flat.numel() for flat in self.host.values())

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
        from offbatch.models.synth import synth_tensor

        name, info = self.infos[canonical]
        return synth_tensor(self.spec, name, self.seed)
