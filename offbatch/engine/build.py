"""Assemble the streaming engine: weights into host tiers, a plan under the budgets, the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from offbatch.engine.streaming import StreamingEngine
from offbatch.models.loader import open_checkpoint
from offbatch.models.reference import resolve_dtype
from offbatch.offload.weights import CheckpointSource, WeightSource, WeightStore
from offbatch.planner.plan import rule_plan


def cap_gpu_memory(device: torch.device, budget: int | None) -> None:
    """Make the cap a promise: the caching allocator refuses to reserve past it."""
    if device.type != "cuda" or budget is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)


def build_engine(source: WeightSource, device: str = "cpu", dtype=None, gpu_memory: int | None = None,
                 num_requests: int = 64, max_len: int = 2048, eos_token_ids=(), timing: bool = False,
                 default_dtype: torch.dtype = torch.float32, plan_overrides: dict | None = None,
                 **plan_options) -> StreamingEngine:
    dev = torch.device(device)
    dtype = resolve_dtype(dtype, default_dtype)
    max_len = min(max_len, source.spec.max_position)
    store = WeightStore(source, dtype, pin=dev.type == "cuda")
    plan = rule_plan(source.spec, store, str(dev), gpu_memory, num_requests, max_len, **plan_options)
    if plan_overrides:  # experiments and tests: pin fields of the chosen plan
        plan = dataclasses.replace(plan, **plan_overrides)
    cap_gpu_memory(dev, gpu_memory)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    return StreamingEngine(store, plan, eos_token_ids, timing=timing)


def engine_for_folder(model_dir: str | Path, **kwargs) -> StreamingEngine:
    ckpt = open_checkpoint(model_dir)
    kwargs.setdefault("default_dtype", ckpt.dtype())
    return build_engine(CheckpointSource(ckpt), **kwargs)
