"""`offbatch bench`: run a synthetic job through the streaming engine and report rates, the time
split, memory peaks and the physical floor of a decode step."""

from __future__ import annotations

import resource
import time

import torch

from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import build_engine
from offbatch.models.spec import ModelSpec
from offbatch.offload.weights import WeightSource
from offbatch.planner import probe
from offbatch.planner.workload import Workload


def active_params_per_token(spec: ModelSpec) -> int:
    """Weights each token multiplies with in one forward (the MoE experts it is routed to only)."""
    H = spec.hidden_size
    attn = H * (2 * spec.q_size + 2 * spec.kv_size)
    total = 0
    for i in range(spec.num_layers):
        total += attn
        if spec.is_moe_layer(i):
            m = spec.moe
            per_expert = (3 if spec.gated_ffn else 2) * H * m.expert_intermediate_size
            total += m.top_k * per_expert + H * m.num_experts
            total += 3 * H * m.shared_expert_intermediate_size
        else:
            total += (3 if spec.gated_ffn else 2) * H * spec.intermediate_size
    return total + spec.vocab_size * (spec.embed_proj_dim or H)


def decode_flops(spec: ModelSpec, tokens: int, mean_context: float) -> float:
    attn_scores = 4 * spec.num_layers * spec.q_size * mean_context  # QK^T and PV
    return tokens * (2 * active_params_per_token(spec) + attn_scores)


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, max(4, vocab - 1), (n, length), generator=g).tolist()


def disk_report(engine, floor_step: float = 0.0, tokens_per_step: float = 0.0, decode_tok_s: float = 0.0) -> dict:
    """What the disk tier did: modules, bytes read and the reader's own rate (reading time only). With the
    decode step's floor without the disk (floor_step, seconds): the floor with the disk's reads at the rate
    the reader achieved (every step reads the same disk-tier modules), and the decode against it - how much
    of a disk-bound step is not the disk."""
    reader = engine.pf.reader
    if reader is None:
        return {"disk_modules": len(engine.store.disk), "disk_bytes_read": 0}
    steps = max(1, len(engine.step_kinds))
    per_step, rate = reader.bytes_read / steps, reader.bytes_read / reader.read_s if reader.read_s else 0.0
    floor_disk_step = max(floor_step, per_step / rate if rate else 0.0)
    return {"disk_modules": len(engine.store.disk), "disk_bytes_read": reader.bytes_read,
            "disk_bytes_per_step": per_step, "disk_read_s": reader.read_s,
            "disk_read_bytes_s": rate,
            "decode_floor_with_disk_tok_s": tokens_per_step / floor_disk_step if floor_disk_step else 0.0,
            "decode_achieved_over_floor_with_disk":
                decode_tok_s * floor_disk_step / tokens_per_step if floor_disk_step and tokens_per_step else 0.0,
            # Of the raw bytes read, those that bypassed the page cache (O_DIRECT: the disk's own rate).
            "disk_direct_bytes": reader.files.direct_bytes, "disk_buffered_bytes": reader.files.buffered_bytes,
            "staging_bytes": reader.staging_bytes}


def run_bench(source: WeightSource, device: str, gpu_memory: int | None, prompts: int, prompt_len: int,
              gen_len: int, dtype=None, default_dtype=torch.bfloat16, keep_tokens: bool = False, **plan_options) -> dict:
    """keep_tokens: the report's "tokens" holds each prompt's generated ids (comparing two engines' outputs).
    The planner plans for this job (prompts x prompt_len + gen_len) unless plan_options name a workload: left
    to itself it would assume prompts of 3/4 of the context, another job than the one timed."""
    spec = source.spec
    dev = torch.device(device)
    # Ceilings, measured now on this machine, before the engine takes its memory and sets the cap.
    pinned = probe.copy_rate(dev, 1 << 30 if dev.type == "cuda" else 1 << 26)
    inter = max(spec.intermediate_size, spec.moe.expert_intermediate_size if spec.moe else 0)
    gemm_at = {m: probe.gemm_rate(dev, m=m, k=spec.hidden_size, n=inter) for m in (16, 64, 256, 1024)}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    plan_options.setdefault("workload", Workload.uniform(prompts, prompt_len, gen_len))
    t_build = time.perf_counter()
    engine = build_engine(source, device=device, dtype=dtype, gpu_memory=gpu_memory, num_requests=prompts,
                          max_len=prompt_len + gen_len, timing=dev.type == "cuda", default_dtype=default_dtype,
                          **plan_options)
    build_s = time.perf_counter() - t_build
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=gen_len, ignore_eos=True))
            for i, p in enumerate(random_prompts(prompts, prompt_len, spec.vocab_size))]
    t0 = time.perf_counter()
    outputs = {}
    try:
        for o in engine.generate(reqs):
            outputs[o.key] = o.token_ids
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    finally:
        engine.close()  # its threads would keep staging buffers and host KV alive (a grid runs many engines)
    wall = time.perf_counter() - t0
    assert len(outputs) == prompts
    t = engine.times
    stats = engine.pf.stats
    # Bytes streamed per pure decode step: the steps that admitted no prompt.
    decode_bytes = [b for b, p in zip(stats.per_step_bytes, engine.step_kinds) if p == "decode"]
    bytes_per_step = sum(decode_bytes) / max(1, len(decode_bytes))
    tokens_per_step = t.decode_tokens / max(1, t.decode_steps)
    mean_ctx = prompt_len + gen_len / 2
    # GEMM rate at the wave's M (interpolated on the measured points: small M runs far below peak).
    gemm = gemm_at[min(gemm_at, key=lambda m: abs(m - tokens_per_step))]
    floor_step = max(bytes_per_step / pinned, decode_flops(spec, tokens_per_step, mean_ctx) / gemm)
    # The floor counts weights only. A plan with the KV in host memory also moves KV every decode
    # step: over PCIe (GPU attention) or through the host threads (CPU attention). The floor with the KV
    # copies adds those bytes to the link's; CPU attention's reads are reported beside it.
    kv_decode = [kv for kv, p in zip(engine.kv_step_bytes, engine.step_kinds) if p == "decode"]
    kv_read = sum(r for r, _ in kv_decode) / max(1, len(kv_decode))
    kv_copied = sum(c for _, c in kv_decode) / max(1, len(kv_decode))
    floor_kv_step = max((bytes_per_step + kv_copied) / pinned, decode_flops(spec, tokens_per_step, mean_ctx) / gemm)
    decode_tok_s = t.decode_tokens / t.decode_wall_s if t.decode_wall_s else 0.0
    # How even the decode steps were: a few slow ones (a kernel compiled for a new shape, a late copy) read
    # differently from every step being slow.
    walls = sorted(w for w, kind in zip(engine.step_walls, engine.step_kinds) if kind == "decode")
    median = walls[len(walls) // 2] if walls else 0.0
    decode_step_s = {"median": median, "max": walls[-1] if walls else 0.0,
                     "beyond_twice_median": sum(w - median for w in walls if w > 2 * median)}
    floor_tok_s = tokens_per_step / floor_step if floor_step else 0.0
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "family": spec.family, "layers": spec.num_layers, "hidden_size": spec.hidden_size,
        "weights_bytes": engine.store.total_bytes, "gpu_memory_cap": gpu_memory,
        "prompts": prompts, "prompt_len": prompt_len, "gen_len": gen_len,
        "plan": engine.plan.describe(),
        "build_s": build_s, "wall_s": wall,
        "prefill_tok_s": t.prefill_tokens / t.prefill_wall_s if t.prefill_wall_s else 0.0,
        "decode_tok_s": decode_tok_s,
        "e2e_tok_s": prompts * gen_len / wall,
        "decode_steps": t.decode_steps, "prefill_steps": t.prefill_steps, "decode_step_s": decode_step_s,
        "decode_bytes_per_step": bytes_per_step, "decode_tokens_per_step": tokens_per_step,
        "decode_floor_tok_s": floor_tok_s,
        "decode_achieved_over_floor": decode_tok_s / floor_tok_s if floor_tok_s else 0.0,
        "decode_kv_read_bytes_per_step": kv_read, "decode_kv_copied_bytes_per_step": kv_copied,
        "decode_floor_with_kv_copies_tok_s": tokens_per_step / floor_kv_step if floor_kv_step else 0.0,
        "decode_achieved_over_floor_with_kv_copies":
            decode_tok_s * floor_kv_step / tokens_per_step if floor_kv_step and tokens_per_step else 0.0,
        "measured_copy_bytes_s": pinned, "measured_gemm_flop_s": gemm,
        "measured_gemm_flop_s_by_m": gemm_at,
        # Device-side weight waits, and (beside them, wall clock on the host thread, overlapping the rest)
        # where the host was blocked: the routing sync of MoE layers, CPU attention, host KV store waits.
        "time_split_s": {"weight_wait": t.weight_wait_s, "other (compute, host)": max(0.0, t.wall_s - t.weight_wait_s),
                         "host_router_sync": t.router_sync_s, "host_cpu_attention": t.cpu_attention_s,
                         "host_router_sync_in_prefill_steps": t.prefill_router_sync_s,
                         "host_cpu_attention_in_prefill_steps": t.prefill_cpu_attention_s,
                         "host_kv_store_wait": engine.attention.store_wait_s},
        "wasted_fetch_bytes": stats.wasted_bytes,
        **disk_report(engine, floor_kv_step, tokens_per_step, decode_tok_s),
        "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else 0,
        # Allocations that first failed under the cap: each frees the allocator's cache and waits for the
        # device (a plan whose memory estimate is too tight runs slow without failing).
        "gpu_alloc_retries": torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) if dev.type == "cuda" else 0,
        "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **hybrid_report(engine),
        **({"tokens": [outputs[i] for i in range(prompts)]} if keep_tokens else {}),
    }


def hybrid_report(engine) -> dict:
    """What the hybrid FFN did (nothing for a dense plan): calls, cold neurons the host computed per call and
    what share of the cold neurons that is, the host's compute and the device thread's waits for it."""
    h = getattr(engine, "hybrid", None)
    if h is None:
        return {}
    st = dict(h.stats)
    calls = max(1, st["calls"])
    st["cold_neurons_per_call"] = st["cold_neurons"] / calls
    st["cold_share_computed"] = st["cold_neurons"] / max(1, st["cold_count"])
    st["hybrid_layers"] = len(h.layers)
    st["hot_neurons"] = engine.plan.hot_neurons
    st["device_bytes"] = h.device_bytes
    st["host_bytes"] = h.host_bytes
    st["host_dtype"] = str(h.host_dtype).replace("torch.", "")
    st["host_dtype_times"] = h.host_dtype_times
    return {"hybrid_ffn": st}
