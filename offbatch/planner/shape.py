"""What the planner needs to know about a model, without its weights: every module's packed byte size
(exactly as the WeightStore will pack it), grouped into kinds, and the work per token of each kind.

WeightStore pins every weight when it is built, so planning from it would cost the whole model's
host memory and load time before a single decision; this description costs microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offbatch.models.inventory import module_of
from offbatch.models.names import global_tensors, layer_tensors
from offbatch.models.spec import ModelSpec
from offbatch.offload.weights import ALIGN, ModuleKey, module_kind

HEAD_TENSORS = ("lm_head", "final_norm.weight", "final_norm.bias", "project_out")


def group_of(canonical: str, spec: ModelSpec) -> ModuleKey:
    """The module a tensor is packed into (the WeightStore's grouping)."""
    layer, module = module_of(canonical, spec)
    if layer < 0:
        module = "head" if canonical in HEAD_TENSORS else "embed"
    return layer, module


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


@dataclass
class ModelShape:
    spec: ModelSpec
    dtype: torch.dtype
    nbytes: dict[ModuleKey, int]  # every module, embed included
    order: list[ModuleKey] = field(default_factory=list)  # the engine's use order within a step

    def __post_init__(self):
        self.dsize = dtype_bytes(self.dtype)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())

    @property
    def device_keys(self) -> list[ModuleKey]:
        """Modules that run on the compute device (the embedding table stays in host memory)."""
        return [k for k in self.nbytes if k[1] != "embed"]

    def kind_of(self, key: ModuleKey) -> str:
        return module_kind(key[1])

    def kinds(self) -> dict[str, list[ModuleKey]]:
        """Device modules by kind, each list in use order."""
        out: dict[str, list[ModuleKey]] = {}
        for key in self.order:
            out.setdefault(self.kind_of(key), []).append(key)
        return out

    def kv_bytes_per_token(self) -> int:
        """K and V of one position of one sequence, all layers."""
        return 2 * self.spec.num_layers * self.spec.kv_size * self.dsize


def use_order(spec: ModelSpec, keys) -> list[ModuleKey]:
    """The order in which the engine acquires modules in one step (StreamingEngine._schedule_step)."""
    present = set(keys)
    order: list[ModuleKey] = []
    for i in range(spec.num_layers):
        order.append((i, "attn"))
        if spec.is_moe_layer(i):
            order.append((i, "router"))
            if spec.moe.shared_expert_intermediate_size:
                order.append((i, "shared"))
            order += [(i, f"expert.{e}") for e in range(spec.moe.num_experts)]
        else:
            order.append((i, "ffn"))
    order.append((-1, "head"))
    return [k for k in order if k in present]


def packed_bytes(shapes, dsize: int) -> int:
    """A module's flat buffer size: every tensor padded to ALIGN (offload.weights.make_layout's rule)."""
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += -(-n * dsize // ALIGN) * ALIGN
    return total


def _module_bytes(tensors, spec: ModelSpec, dsize: int) -> dict[ModuleKey, int]:
    groups: dict[ModuleKey, list[tuple[int, ...]]] = {}
    for info in tensors:
        groups.setdefault(group_of(info.canonical, spec), []).append(tuple(info.shape))
    return {key: packed_bytes(shapes, dsize) for key, shapes in groups.items()}


def shape_from_spec(spec: ModelSpec, dtype: torch.dtype) -> ModelShape:
    """Every module's packed size. Layers of one kind (dense or MoE) have the same tensors, so one
    layer of each kind is laid out and its sizes repeated (a 48-layer, 128-expert model has 18k tensors)."""
    dsize = dtype_bytes(dtype)
    nbytes = _module_bytes(global_tensors(spec).values(), spec, dsize)
    per_kind: dict[bool, dict[str, int]] = {}
    for i in range(spec.num_layers):
        moe = spec.is_moe_layer(i)
        if moe not in per_kind:
            per_kind[moe] = {m: n for (_, m), n in _module_bytes(layer_tensors(spec, i).values(), spec, dsize).items()}
        nbytes.update({(i, m): n for m, n in per_kind[moe].items()})
    return ModelShape(spec, dtype, nbytes, use_order(spec, nbytes))


def shape_from_store(store) -> ModelShape:
    """The same description read off a built WeightStore (its sizes are the truth when one exists)."""
    nbytes = {key: store.nbytes(key) for key in store.keys()}
    return ModelShape(store.spec, store.dtype, nbytes, use_order(store.spec, nbytes))


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
