"""What the planner needs to know about a model, without its weights: every module's packed byte size
(laid out by the weight format exactly as the WeightStore lays it out), grouped into kinds, and the
work per token of each kind.

WeightStore pins every weight when it is built, so planning from it would cost the whole model's
host memory and load time before a single decision; this description costs microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offbatch.ffn import layer_modules
from offbatch.formats import DENSE, WeightFormat
from offbatch.formats.base import dtype_bytes
from offbatch.models.catalogue import ModuleKey, module_kind, modules_of, step_order
from offbatch.models.names import global_tensors, layer_tensors
from offbatch.models.spec import ModelSpec
from offbatch.offload.weights import module_layout


@dataclass
class ModelShape:
    spec: ModelSpec
    dtype: torch.dtype
    nbytes: dict[ModuleKey, int]  # every module, embed included
    order: list[ModuleKey] = field(default_factory=list)  # the engine's use order within a step
    weights: str = DENSE.name  # the weight format the sizes are of

    def __post_init__(self):
        self.dsize = dtype_bytes(self.dtype)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())

    def kind_of(self, key: ModuleKey) -> str:
        return module_kind(key[1])

    def kinds(self) -> dict[str, list[ModuleKey]]:
        """Device modules by kind, each list in use order."""
        out: dict[str, list[ModuleKey]] = {}
        for key in self.order:
            out.setdefault(self.kind_of(key), []).append(key)
        return out


def step_order_of(spec: ModelSpec, keys) -> list[ModuleKey]:
    """The order in which a step acquires the modules present in `keys`: the catalogue's step order
    over the modules the layers' backends declare (offbatch.ffn.layer_modules), as the engine's."""
    return step_order(spec.num_layers, keys, layer_modules(spec))


def _module_bytes(tensors, spec: ModelSpec, dtype: torch.dtype, fmt: WeightFormat) -> dict[ModuleKey, int]:
    shapes = {info.canonical: tuple(info.shape) for info in tensors}
    return {key: module_layout(fmt, parts, shapes.__getitem__, dtype).nbytes
            for key, parts in modules_of(shapes, spec).items()}


def shape_from_spec(spec: ModelSpec, dtype: torch.dtype, fmt: WeightFormat = DENSE) -> ModelShape:
    """Every module's packed size. Layers of one kind (dense or MoE) have the same tensors, so one
    layer of each kind is laid out and its sizes repeated (a 48-layer, 128-expert model has 18k tensors)."""
    nbytes = _module_bytes(global_tensors(spec).values(), spec, dtype, fmt)
    per_kind: dict[bool, dict[str, int]] = {}
    for i in range(spec.num_layers):
        moe = spec.is_moe_layer(i)
        if moe not in per_kind:
            per_kind[moe] = {m: n for (_, m), n in _module_bytes(layer_tensors(spec, i).values(), spec, dtype, fmt).items()}
        nbytes.update({(i, m): n for m, n in per_kind[moe].items()})
    return ModelShape(spec, dtype, nbytes, step_order_of(spec, nbytes), fmt.name)


def shape_from_store(store) -> ModelShape:
    """The same description read off a built WeightStore (its sizes are the truth when one exists)."""
    nbytes = {key: store.nbytes(key) for key in store.keys()}
    return ModelShape(store.spec, store.dtype, nbytes, step_order_of(store.spec, nbytes), store.format.name)


# ---- work per token ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """Multiply-adds (x2 = FLOPs) per token of each module kind in one layer, plus the head's per
    sequence. Everything else (norms, rope, residuals) is memory traffic, counted in bytes."""

    attn_proj: int  # q, k, v, o
    ffn: int  # a dense FFN layer
    router: int
    expert: int  # one routed copy of a token through one expert
    shared: int
    head: int  # per sampled sequence
    top_k: int
    num_experts: int
    moe_layers: int
    dense_layers: int


def work_of(spec: ModelSpec) -> Work:
    H = spec.hidden_size
    mats = 3 if spec.gated_ffn else 2
    moe_layers = sum(1 for i in range(spec.num_layers) if spec.is_moe_layer(i))
    m = spec.moe
    return Work(
        attn_proj=H * (2 * spec.q_size + 2 * spec.kv_size),
        ffn=mats * H * spec.intermediate_size,
        router=H * m.num_experts if m else 0,
        expert=mats * H * m.expert_intermediate_size if m else 0,
        shared=3 * H * m.shared_expert_intermediate_size if m else 0,
        head=spec.vocab_size * (spec.embed_proj_dim or H),
        top_k=m.top_k if m else 0,
        num_experts=m.num_experts if m else 0,
        moe_layers=moe_layers,
        dense_layers=spec.num_layers - moe_layers,
    )
