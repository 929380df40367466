"""Assemble the streaming engine: a plan under the budgets (the planner's, or one pinned), weights into
host tiers, the engine.

The plan is made before the weights are packed: the solver works from the model's shape alone, so a
budget too small to run at all is one clear error before gigabytes are pinned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from offbatch.engine.streaming import StreamingEngine
from offbatch.errors import OffbatchError
from offbatch.models.loader import open_checkpoint
from offbatch.models.reference import resolve_dtype
from offbatch.offload.weights import CheckpointSource, WeightSource, WeightStore, module_kind
from offbatch.planner.plan import Plan
from offbatch.planner.shape import shape_from_store
from offbatch.planner.solve import make_plan
from offbatch.planner.workload import Workload


def cap_gpu_memory(device: torch.device, budget: int | None) -> None:
    """Make the cap a promise: the caching allocator refuses to reserve past it."""
    if device.type != "cuda" or budget is None:
        return
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)


def check_plan(plan: Plan, store: WeightStore, device: torch.device) -> None:
    """A pinned plan must fit this model and device: resident modules that exist, a slot ring for
    every kind that streams, the same dtype."""
    if torch.device(plan.device).type != device.type:
        raise OffbatchError(f"the plan was made for device {plan.device!r}, not {device.type!r}")
    if plan.dtype != store.dtype:
        raise OffbatchError(f"the plan was made for {plan.dtype}, the engine computes in {store.dtype}")
    keys = set(store.keys())
    unknown = sorted(k for k in plan.resident if k not in keys)
    if unknown:
        raise OffbatchError(f"the plan names modules this model does not have, e.g. {unknown[0]}: "
                            "was it made for another model?")
    streamed = {module_kind(k[1]) for k in keys if k[1] not in ("embed", "router") and k not in plan.resident}
    missing = sorted(streamed - {k for k, n in plan.slots.items() if n > 0})
    if missing:
        raise OffbatchError(f"the plan streams {', '.join(missing)} modules but gives them no device slots")


def build_engine(source: WeightSource, device: str = "cpu", dtype=None, gpu_memory: int | None = None,
                 num_requests: int = 64, max_len: int = 2048, eos_token_ids=(), timing: bool = False,
                 default_dtype: torch.dtype = torch.float32, plan_overrides: dict | None = None,
                 plan: Plan | None = None, workload: Workload | None = None, hardware=None,
                 cpu_memory: int | None = None, store: WeightStore | None = None, **plan_options) -> StreamingEngine:
    """plan: pin this plan (e.g. `Plan.from_dict` of a `plan --json` file) instead of solving.
    workload: the job (prompt and generation lengths, request count) the planner optimises for;
    without one it assumes num_requests prompts filling 3/4 of max_len.
    hardware: a Hardware, a profile name or file; None probes this machine (cached; on the CPU the
    fixed `cpu` profile). plan_options pin knobs (wave_size, prefill_tokens, ffn_micro_tokens,
    attn_micro_batch, kv_placement, decode_attention) or bound them (max_wave, max_resident_bytes).
    plan_overrides: replace fields of the chosen plan afterwards (experiments).
    store: reuse weights already packed (benchmark grids: packing a large model takes a while)."""
    dev = torch.device(device)
    dtype = resolve_dtype(dtype, default_dtype)
    spec = source.spec
    if plan is None:
        max_len = min(max_len, spec.max_position)
        if workload is None:
            workload = Workload.guess(num_requests, max_len)
        shape = shape_from_store(store) if store is not None else None
        budget = gpu_memory
        if budget is None and dev.type == "cuda":  # no cap given: plan for what is free now
            budget = torch.cuda.mem_get_info(dev.index if dev.index is not None else torch.cuda.current_device())[0]
        plan = make_plan(spec, dtype, str(dev), budget, workload, hardware=hardware, cpu_memory=cpu_memory,
                         shape=shape, **plan_options)
    elif plan_options:
        raise TypeError(f"options {sorted(plan_options)} cannot be combined with a pinned plan")
    if plan_overrides:  # experiments and tests: pin fields of the chosen plan
        plan = dataclasses.replace(plan, **plan_overrides)
    if store is None:
        store = WeightStore(source, dtype, pin=dev.type == "cuda", disk=plan.disk)
    elif store.dtype != dtype or store.spec != spec:
        raise OffbatchError("the packed weights given are of another model or dtype")
    elif set(store.disk) != set(plan.disk):
        raise OffbatchError("the packed weights given were packed for another disk tier than the plan's")
    check_plan(plan, store, dev)
    cap_gpu_memory(dev, gpu_memory)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.reset_accumulated_memory_stats(dev)  # bench reports this engine's allocator retries
    return StreamingEngine(store, plan, eos_token_ids, timing=timing)


def engine_for_folder(model_dir: str | Path, **kwargs) -> StreamingEngine:
    ckpt = open_checkpoint(model_dir)
    kwargs.setdefault("default_dtype", ckpt.dtype())
    return build_engine(CheckpointSource(ckpt), **kwargs)
