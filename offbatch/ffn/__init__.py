"""FFN backends (one file each) and the choices made from them: which modules a layer acquires, in
order, and which backend runs a model's MoE layers.

`layer_modules(spec)` is the one source of a step's module order for both the engine's prefetch
schedule and the planner (via catalogue.step_order)."""

from __future__ import annotations

import os
from collections.abc import Callable

from offbatch.ffn.base import FFN_BACKENDS, FFNBackend, Modules, get_ffn, register_ffn
from offbatch.ffn.dense import DenseFFN
from offbatch.ffn.hybrid import HybridFFN
from offbatch.ffn.moe_grouped import GroupedMoE
from offbatch.ffn.moe_loop import LoopMoE
from offbatch.models.spec import ModelSpec

__all__ = ["FFN_BACKENDS", "FFNBackend", "Modules", "get_ffn", "register_ffn", "choose_moe", "layer_modules",
           "build_ffns", "DenseFFN", "HybridFFN", "GroupedMoE", "LoopMoE"]

ATTENTION_MODULES = ["attn"]  # what every attention backend acquires today (its `modules` declaration)


def choose_moe(spec: ModelSpec, dtype) -> str:
    """The backend for a model's MoE layers ("" for a dense model): the grouped kernels where they
    apply, else the per-expert loop. OFFBATCH_GROUPED_EXPERTS=0 forces the loop (an escape hatch, and
    a baseline)."""
    if spec.moe is None:
        return ""
    if os.environ.get("OFFBATCH_GROUPED_EXPERTS", "1") != "0" and GroupedMoE.applies(spec, dtype):
        return GroupedMoE.name
    return LoopMoE.name


def layer_modules(spec: ModelSpec, moe_backend: str | None = None, attention=None) -> Callable[[int], list[str]]:
    """layer -> the modules that layer acquires in one step, in order: its attention backend's
    (`attention.modules`; default ATTENTION_MODULES), then its FFN backend's (dense layers: `dense`;
    MoE layers: `moe_backend`, default the loop's declaration, which every MoE backend shares today)."""
    moe = get_ffn(moe_backend) if moe_backend else LoopMoE

    def modules(layer: int) -> list[str]:
        ffn = moe if spec.is_moe_layer(layer) else DenseFFN
        attn = attention.modules(spec, layer) if attention is not None else ATTENTION_MODULES
        return [*attn, *ffn.modules(spec, layer)]

    return modules


def build_ffns(spec: ModelSpec, modules: Modules, micro_tokens: int, moe_backend: str = "",
               dtype=None) -> dict[bool, FFNBackend]:
    """The FFN backends of a forward over `modules`: {False: dense layers', True: MoE layers'} (no MoE
    entry for a dense model). moe_backend: the plan's name ("": choose_moe for `dtype`); a backend that
    cannot run over these modules (grouped kernels on weights not stored dense) gives way to the loop,
    as does the grouped one under OFFBATCH_GROUPED_EXPERTS=0."""
    ffns: dict[bool, FFNBackend] = {False: DenseFFN(spec, modules, micro_tokens)}
    if spec.moe is not None:
        name = moe_backend or choose_moe(spec, dtype)
        if name == GroupedMoE.name and os.environ.get("OFFBATCH_GROUPED_EXPERTS", "1") == "0":
            name = LoopMoE.name
        cls = get_ffn(name)
        if not cls.runs_on(spec, modules):
            cls = LoopMoE
        ffns[True] = cls(spec, modules, micro_tokens)
    return ffns
