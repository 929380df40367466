"""The module catalogue: which tensors form which module, its kind, its default device slots, and the
order of a step's modules - the one place the weight store, the prefetcher's schedule, the engine and
the planner read.

A module is the unit that is placed (resident, host, disk) and streamed: a layer's attention, dense
FFN, router, shared expert, one routed expert; the embedding; the output head. Its parts are tensors
of the checkpoint, or row slices of them (`Part.rows`: a FFN split into hot and cold neurons holds
rows of gate/up in two modules). Modules of one kind have one layout in every layer, so a device slot
of the kind holds any of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from offbatch.models.spec import ModelSpec

if TYPE_CHECKING:
    from offbatch.models.loader import Checkpoint

ModuleKey = tuple[int, str]  # (layer, module); layer -1 for the embedding and the head

# Global tensors that go with the output head; the other globals form the embedding.
HEAD_TENSORS = ("lm_head", "final_norm.weight", "final_norm.bias", "project_out")
# Device slots per streamed module kind: two let one copy run while the other module computes; experts
# get three because they are many and small, so a copy never waits for the expert before it to finish.
DEFAULT_SLOTS = {"attn": 2, "ffn": 2, "shared": 2, "expert": 3, "head": 1, "router": 2}


@dataclass(frozen=True)
class Part:
    """One tensor of a module: its name inside the module, the checkpoint's canonical name, and the rows
    of that tensor it holds (None: all of them)."""

    local: str
    canonical: str
    rows: tuple[int, int] | None = None

    def shape(self, full: Sequence[int]) -> tuple[int, ...]:
        """This part's shape, given the shape of the whole tensor."""
        if self.rows is None:
            return tuple(full)
        a, b = self.rows
        if not 0 <= a < b <= full[0]:
            raise ValueError(f"rows {self.rows} of {self.canonical!r} are outside its {full[0]} rows")
        return (b - a, *full[1:])


def module_kind(module: str) -> str:
    """Modules of one kind share a layout and so can share device slots."""
    return "expert" if module.startswith("expert.") else module


def module_of(canonical: str, spec: ModelSpec) -> ModuleKey:
    """Canonical tensor name -> the module it is packed into: (layer, attn | ffn | router | shared |
    expert.E), or (-1, embed | head). Norm weights travel with the module whose input they normalise
    (in MoE layers the FFN norm goes with the router, which every token needs)."""
    parts = canonical.split(".")
    if parts[0] != "layers":
        return -1, ("head" if canonical in HEAD_TENSORS else "embed")
    layer, local = int(parts[1]), parts[2]
    if local in ("attn_norm", "q", "k", "v", "o", "q_norm", "k_norm"):
        return layer, "attn"
    if local == "experts":
        return layer, f"expert.{parts[3]}"
    if local in ("shared", "shared_gate"):
        return layer, "shared"
    if local == "router" or (local == "ffn_norm" and spec.is_moe_layer(layer)):
        return layer, "router"
    return layer, "ffn"  # ffn_norm, gate, up, down


def local_name(canonical: str, key: ModuleKey) -> str:
    """A tensor's name inside its module: without the "layers.N." prefix."""
    return canonical[len(f"layers.{key[0]}."):] if key[0] >= 0 else canonical


def modules_of(names: Iterable[str], spec: ModelSpec) -> dict[ModuleKey, list[Part]]:
    """Every module of a model with these tensors, its parts in name order, the modules in key order."""
    groups: dict[ModuleKey, list[Part]] = {}
    for canonical in names:
        key = module_of(canonical, spec)
        groups.setdefault(key, []).append(Part(local_name(canonical, key), canonical))
    return {key: sorted(parts, key=lambda p: p.local) for key, parts in sorted(groups.items())}


def step_order(num_layers: int, keys: Iterable[ModuleKey],
               layer_modules: Callable[[int], Sequence[str]]) -> list[ModuleKey]:
    """The order in which one step uses modules: each layer's modules as its backends declare them
    (`layer_modules(i)`: attention's, then the FFN's), then the head; modules the model lacks left out."""
    present = set(keys)
    order = [(i, m) for i in range(num_layers) for m in layer_modules(i)] + [(-1, "head")]
    return [k for k in order if k in present]


@dataclass
class LayerBytes:
    """A layer's bytes per module, as stored in the checkpoint (offbatch inspect)."""

    layer: int
    modules: dict[str, int] = field(default_factory=dict)

    @property
    def attn(self) -> int:
        return self.modules.get("attn", 0)

    @property
    def experts(self) -> list[int]:
        keys = sorted((k for k in self.modules if k.startswith("expert.")), key=lambda k: int(k.split(".")[1]))
        return [self.modules[k] for k in keys]

    @property
    def total(self) -> int:
        return sum(self.modules.values())


def module_bytes(ckpt: "Checkpoint") -> tuple[dict[str, int], list[LayerBytes]]:
    """Bytes of each global tensor (by its name's first part: embed, lm_head, final_norm, ...) and of each
    layer's modules, as stored in the checkpoint."""
    globals_: dict[str, int] = defaultdict(int)
    layers = [LayerBytes(i) for i in range(ckpt.spec.num_layers)]
    for canonical, entry in ckpt.entries.items():
        layer, module = module_of(canonical, ckpt.spec)
        if layer < 0:
            globals_[canonical.split(".")[0]] += entry.nbytes
        else:
            layers[layer].modules[module] = layers[layer].modules.get(module, 0) + entry.nbytes
    return dict(globals_), layers
