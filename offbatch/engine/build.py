"""Assemble the streaming engine: a plan under the budgets (the planner's, or one pinned), weights into
host tiers, the engine.

The plan is made before the weights are packed: the solver works from the model's shape alone, so a
budget too small to run at all is one clear error before gigabytes are pinned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from offbatch.attention import get_attention
from offbatch.engine.streaming import StreamingEngine
from offbatch.errors import BudgetError, OffbatchError, PlanFileError
from offbatch.formats import DENSE, get_format
from offbatch.models.catalogue import module_kind
from offbatch.models.loader import check_format, open_checkpoint
from offbatch.models.dtypes import resolve_dtype
from offbatch.offload.kv import kv_format
from offbatch.offload.weights import CheckpointSource, WeightSource, WeightStore
from offbatch.plan import Plan
from offbatch.planner.probe import device_memory_bytes
from offbatch.planner.shape import ModelShape, shape_from_spec, shape_from_store
from offbatch.planner.solve import make_plan, resolve_hardware
from offbatch.planner.workload import Workload
from offbatch.units import format_bytes


def cap_gpu_memory(device: torch.device, budget: int | None) -> None:
    """Make the cap a promise: the caching allocator refuses to reserve past it. A cap above the GPU's
    memory is refused (a pinned plan never met the planner, which refuses it too)."""
    if device.type != "cuda" or budget is None:
        return
    total = device_memory_bytes(str(device))
    if budget > total:
        raise BudgetError(f"--gpu-memory {format_bytes(budget)} is more than this GPU's {format_bytes(total)} "
                          f"({torch.cuda.get_device_name(device)}): give at most that")
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(budget / total, index)


def check_plan(plan: Plan, shape: ModelShape, device: torch.device, gpu_memory: int | None = None) -> None:
    """A pinned plan must fit this model and device: resident modules that exist, a slot ring for
    every kind that streams, the same dtype, a context the model has, and the memory its KV, slots and
    resident weights take must be there (the cap, else the device; host KV: the host). Checked from the
    model's shape before any weight is packed, so an absurd hand-edited plan is one clear error, not an
    allocation that fails or swaps the machine."""
    if torch.device(plan.device).type != device.type:
        raise PlanFileError(f"the plan was made for device {plan.device!r}, not {device.type!r}")
    if plan.dtype != shape.dtype:
        raise PlanFileError(f"the plan was made for {plan.dtype}, the engine computes in {shape.dtype}")
    spec = shape.spec
    if plan.max_len > spec.max_position:
        raise PlanFileError(f"the plan's context is {plan.max_len} tokens; the model's is {spec.max_position}")
    keys = set(shape.nbytes)
    unknown = sorted(k for k in plan.resident | plan.disk if k not in keys)
    if unknown:
        raise PlanFileError(f"the plan names modules this model does not have, e.g. {unknown[0]}: "
                            "was it made for another model?")
    streamed = {module_kind(k[1]) for k in keys if k[1] not in ("embed", "router") and k not in plan.resident}
    missing = sorted(streamed - {k for k, n in plan.slots.items() if n > 0})
    if missing:
        raise PlanFileError(f"the plan streams {', '.join(missing)} modules but gives them no device slots")
    largest: dict[str, int] = {}
    for k, n in shape.nbytes.items():
        largest[module_kind(k[1])] = max(largest.get(module_kind(k[1]), 0), n)
    weights = sum(shape.nbytes[k] for k in plan.resident) + sum(n * largest.get(kind, 0) for kind, n in plan.slots.items())
    kv = plan.wave_size * kv_format(plan.kv_format, shape.dtype).slot_bytes(spec, plan.max_len)
    host_kv = get_attention(plan.attention).kv_on_host and device.type == "cuda"
    on_device = weights + (0 if host_kv else kv)
    limit = gpu_memory if gpu_memory is not None else device_memory_bytes(str(device))
    where = "the --gpu-memory cap" if gpu_memory is not None else "the device's memory"
    if on_device > limit:
        raise PlanFileError(f"the plan holds {format_bytes(on_device)} on the device (KV of {plan.wave_size} sequences "
                            f"x {plan.max_len} tokens: {format_bytes(0 if host_kv else kv)}; weights: "
                            f"{format_bytes(weights)}), more than {where}, {format_bytes(limit)}: plan again for it")
    if host_kv:
        from offbatch.planner.probe import host_memory_bytes

        if kv > host_memory_bytes():
            raise PlanFileError(f"the plan's host KV ({plan.wave_size} sequences x {plan.max_len} tokens) is "
                                f"{format_bytes(kv)}, more than this machine's {format_bytes(host_memory_bytes())}")


def build_engine(source: WeightSource, device: str = "cpu", dtype=None, gpu_memory: int | None = None,
                 num_requests: int = 64, max_len: int = 2048, eos_token_ids=(), timing: bool = False,
                 default_dtype: torch.dtype = torch.float32, plan_overrides: dict | None = None,
                 plan: Plan | None = None, workload: Workload | None = None, hardware=None,
                 cpu_memory: int | None = None, store: WeightStore | None = None, neurons=None, key_scales=None,
                 group=None, plan_only: bool = False, **plan_options) -> StreamingEngine | Plan:
    """plan: pin this plan (e.g. `Plan.from_dict` of a `plan --json` file) instead of solving.
    workload: the job (prompt and generation lengths, request count) the planner optimises for;
    without one it assumes num_requests prompts filling 3/4 of max_len.
    hardware: a Hardware, a profile name or file; None probes this machine (cached; on the CPU the
    fixed `cpu` profile). plan_options pin knobs (wave_size, prefill_tokens, ffn_micro_tokens,
    attn_micro_batch, attention, residency_order) or bound them (max_wave, max_resident_bytes), or
    name the weight format to plan for and pack in (weights; default dense).
    plan_overrides: replace fields of the chosen plan afterwards (experiments).
    store: reuse weights already packed (benchmark grids: packing a large model takes a while).
    neurons: the model's neuron statistics and predictors (ffn.neurons.NeuronStats): the planner may then
    choose the hybrid FFN (`ffn="hybrid"` among plan_options allows it; it is lossy with predictors).
    group: a ShardGroup whose ranks split the weight stream (engine/split.py); every rank runs one plan.
    plan_only: return the checked plan without packing the weights (engine/split.py plans once for its ranks)."""
    dev = torch.device(device)
    dtype = resolve_dtype(dtype, default_dtype)
    spec = source.spec
    held = getattr(getattr(source, "ckpt", None), "format", None)  # a folder's own format
    asked = plan_options.pop("weights", None)
    if plan is not None and asked not in (None, plan.weights):
        raise OffbatchError(f"weights {asked}: the pinned plan is for {plan.weights} weights")
    weights = plan.weights if plan is not None else asked or (held or DENSE).name
    if held is not None:
        check_format(source.ckpt, get_format(weights))
    if plan is None:
        plan_options["weights"] = weights
        max_len = min(max_len, spec.max_position)
        if workload is None:
            workload = Workload.guess(num_requests, max_len)
        shape = shape_from_store(store) if store is not None else None
        budget = gpu_memory
        if budget is None and dev.type == "cuda":  # no cap given: plan for what is free now
            budget = torch.cuda.mem_get_info(dev.index if dev.index is not None else torch.cuda.current_device())[0]
        plan = make_plan(spec, dtype, str(dev), budget, workload, hardware=hardware, cpu_memory=cpu_memory,
                         shape=shape, disk_tier=getattr(source, "ckpt", None) is not None, neurons=neurons,
                         **plan_options)
    elif plan_options:
        raise TypeError(f"options {sorted(plan_options)} cannot be combined with a pinned plan")
    if plan_overrides:  # experiments and tests: pin fields of the chosen plan
        plan = dataclasses.replace(plan, **plan_overrides)
    if plan.dense_ffn == "hybrid" and neurons is None:
        raise PlanFileError("the plan's FFN is hybrid: it needs the model's profile statistics and predictors "
                            "(--ffn hybrid, with them beside the model)")
    if store is not None and (store.dtype != dtype or store.spec != spec):
        raise OffbatchError("the packed weights given are of another model or dtype")
    if store is not None and set(store.disk) != set(plan.disk):
        raise OffbatchError("the packed weights given were packed for another disk tier than the plan's")
    fmt = get_format(plan.weights)
    if store is not None and store.format.name != fmt.name:
        raise OffbatchError(f"the packed weights given are in the {store.format.name} format, the plan's are {fmt.name}")
    # Every check before the weights are packed (which pins the model in host memory).
    check_plan(plan, shape_from_store(store) if store is not None else shape_from_spec(spec, dtype, fmt), dev, gpu_memory)
    if plan_only:
        return plan
    cap_gpu_memory(dev, gpu_memory)
    if store is None:
        store = WeightStore(source, dtype, pin=dev.type == "cuda", disk=plan.disk, fmt=fmt,
                            encode_on=dev if dev.type == "cuda" else "cpu",
                            shard=group.own_range if group is not None else None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.reset_accumulated_memory_stats(dev)  # bench reports this engine's allocator retries
    return StreamingEngine(store, plan, eos_token_ids, timing=timing, neurons=neurons, key_scales=key_scales,
                           group=group)


def engine_for_folder(model_dir: str | Path, weights: str | None = None, **kwargs) -> StreamingEngine:
    """weights: the format to plan for and run in (None: the folder's own; a pinned plan names its own)."""
    ckpt = open_checkpoint(model_dir)
    kwargs.setdefault("default_dtype", ckpt.dtype())
    if weights is not None:
        kwargs["weights"] = weights
    if kwargs.get("hardware") is None and kwargs.get("plan") is None:
        # This machine as `plan MODEL_DIR` and `bench MODEL_DIR` see it: the cached probe with the disk
        # read rate of the folder's file system, so that `run` plans what they plan.
        kwargs["hardware"] = resolve_hardware(None, str(kwargs.get("device") or "cpu"), model_dir)
    return build_engine(CheckpointSource(ckpt), **kwargs)
