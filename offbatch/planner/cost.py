"""The cost model: the time of one engine step from bytes, FLOPs and host work, and a whole job from
its steps.

One step runs every layer once over the step's tokens (the wave's decode tokens plus newly admitted
prompts). What overlaps, as the engine does it:
  - the copy stream moves streamed weights (and, with host KV and GPU attention, the wave's KV, which
    shares the link) while the compute stream works: a step takes at least copy + the head's compute
    (the head runs after the last copy), and at least the compute chain; where the two are close, more
    than either (each waits for the other now and then: a p-norm of the two, OVERLAP_P);
  - the compute chain: GPU kernels (GEMMs at the efficiency of their M, attention and elementwise
    traffic at device-memory rate; or the time to launch them, if Python is slower), plus what runs
    serially beside it: KV copies issued on the compute stream, CPU attention (q over, output back),
    one host sync per MoE layer;
  - new K/V going back to host KV (a device-to-host copy stream and a writer thread) run beside it;
  - then serial host work: embedding the step's tokens on the host, sampling and bookkeeping per
    sequence (the copy stream is idle then: the next step's copies are issued when it starts).
On the CPU as compute device nothing overlaps: copy + chain + host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from offbatch.attention import get_attention
from offbatch.formats import DENSE, get_format
from offbatch.offload.kv import kv_format
from offbatch.planner.hardware import Hardware
from offbatch.planner.memory import Knobs
from offbatch.planner.residency import Residency
from offbatch.planner.shape import ModelShape, shape_from_spec, work_of
from offbatch.planner.workload import Workload


# How close to perfect the overlap of copies and compute is (a p-norm of the two loads; see StepModel):
# 4 puts a step whose loads are equal 19% over either. Fitted to the H200 grids of 2026-11-28c-e (p = 3
# to 8 all brought the balanced points in; 4 had the smallest median error), decode errors there: the
# median fell from 5-6% to 4-7%, the worst balanced point (Llama-3-8B, 24 GiB, wave 205) from +35% to +15%.
OVERLAP_P = 4.0


@dataclass
class StepTime:
    total_s: float
    copy_s: float  # host-to-device link busy: streamed weights and KV
    gpu_s: float  # device kernels (or launching them, when that is slower)
    cpu_attn_s: float
    kv_copy_s: float  # host KV brought over on the compute stream (in the chain, sharing the link)
    serial_s: float  # other serial parts of the chain: blocking copies back to host KV, syncs
    host_s: float  # serial host work after the chain
    weight_bytes: float
    kv_bytes: float
    flops: float
    tokens: int
    sequences: int
    disk_s: float = 0.0  # reading the step's disk-tier modules (beside the copies, on the reader thread)

    def bottleneck(self) -> str:
        """The term that sets the step's length: disk, pcie, gpu, cpu-attention or host."""
        chain = self.gpu_s + self.cpu_attn_s + self.kv_copy_s + self.serial_s
        if self.host_s > max(self.copy_s, chain, self.disk_s):
            return "host"
        if self.disk_s > max(self.copy_s, chain):
            return "disk"
        if self.copy_s >= chain:
            return "pcie"
        parts = {"gpu": self.gpu_s + self.serial_s, "cpu-attention": self.cpu_attn_s, "pcie": self.kv_copy_s}
        return max(parts, key=parts.get)

    def describe(self) -> dict:
        return {"total_s": self.total_s, "copy_s": self.copy_s, "gpu_s": self.gpu_s, "cpu_attention_s": self.cpu_attn_s,
                "kv_copy_s": self.kv_copy_s, "serial_s": self.serial_s, "host_s": self.host_s, "disk_s": self.disk_s,
                "weight_bytes": self.weight_bytes,
                "kv_bytes": self.kv_bytes, "flops": self.flops, "tokens": self.tokens, "sequences": self.sequences,
                "bottleneck": self.bottleneck()}


def expansion_bytes(shape: ModelShape) -> dict[str, float]:
    """Device bytes of expanding one module of each kind (layer 0's; an expert's): its stored bytes read
    plus its dense bytes written."""
    dense = shape_from_spec(shape.spec, shape.dtype, DENSE).nbytes if shape.weights != DENSE.name else shape.nbytes
    out: dict[str, float] = {}
    for key, n in shape.nbytes.items():
        kind = "expert" if key[1].startswith("expert.") else key[1]
        if key[0] >= 0 and kind not in out and kind != "router":
            out[kind] = float(n + dense[key])
    return out


class StepModel:
    """Step times of one plan (knobs + residency) on one machine."""

    def __init__(self, shape: ModelShape, hw: Hardware, knobs: Knobs, res: Residency, max_len: int,
                 disk_fraction: float = 0.0, hybrid=None, split: int = 1):
        """hybrid: a hybrid FFN candidate (planner.hybrid_ffn.HybridTerms), bound here to this residency.
        split: GPUs splitting the weight stream (offload/shard_group.py); this models one rank of them."""
        self.shape, self.hw, self.knobs, self.res = shape, hw, knobs, res
        self.split = max(1, int(split))
        self.hybrid = hybrid.bind(res, shape) if hybrid is not None and hw.device == "cuda" else None
        self.disk_fraction = disk_fraction  # share of the streamed weight bytes read from disk
        spec = shape.spec
        self.work = work_of(spec)
        self.L = spec.num_layers
        self.max_len = max_len
        self.kv_row = kv_format(knobs.kv_format, shape.dtype).layer_bytes_per_token(spec)  # K+V of a position, a layer
        # The same in the compute dtype: CPU attention is bound by the values it multiplies, not the bytes it
        # reads (packed rows ran at about the same values per second as bf16 on the host threads:
        # scripts/bench_host_attention.py), so its time is priced by these.
        self.kv_row_values = kv_format("dense", shape.dtype).layer_bytes_per_token(spec)
        # The attention backend's terms; on a CPU it runs as KV on the compute device.
        self.attention = get_attention(knobs.attention).for_device(hw.device)
        self.cpu_attn = self.attention.attends_on_host
        self.overlap = hw.device == "cuda"
        self.embed_row = (spec.embed_proj_dim or spec.hidden_size) * shape.dsize
        # Streaming at all decides whether CPU attention shares host DRAM with copies.
        self.streams = res.streamed_dense_bytes + res.streamed_experts > 0
        # Exposed at the start of a step: the compute of the layers before the first streamed module (the
        # resident stretch of "layer" order; spread out, about none), less what the copy stream does
        # meanwhile: fill the slot rings, no further (copies run in use order, each waits for a slot).
        self.lead_share = res.lead_layers / self.L if self.streams else 0.0
        self.ring_fill_s = res.slot_bytes / hw.h2d_pinned_bytes_s
        self.fmt = get_format(shape.weights)
        if self.fmt.expands and self.overlap:
            self.expand = shape.__dict__.get("_expansion") or shape.__dict__.setdefault("_expansion", expansion_bytes(shape))
        else:
            self.expand = {}

    def times(self, decode, admitted, prompt_len: float, ctx_mean, ctx_max) -> dict[str, np.ndarray]:
        """Vectorised over steps: every argument but prompt_len an array (or scalar) of the same shape."""
        hw, w, k, L = self.hw, self.work, self.knobs, self.L
        spec = self.shape.spec
        dsize = self.shape.dsize
        decode = np.asarray(decode, dtype=np.float64)
        admitted = np.asarray(admitted, dtype=np.float64)
        ctx_mean = np.asarray(ctx_mean, dtype=np.float64)
        T = decode + admitted * prompt_len  # tokens through every layer
        S = decode + admitted  # sequences sampled
        g = hw.gemm_rates
        zero = np.zeros_like(T)

        # ---- bytes over the link --------------------------------------------------------------
        if w.num_experts:
            use = 1.0 - (1.0 - w.top_k / w.num_experts) ** T  # chance an expert gets a token of the step
            if self.split > 1:  # a split stream fetches every expert (modules.py: ranks issue the same copies)
                use = zero + 1.0
            n_used = w.num_experts * use
            weight_bytes = self.res.streamed_dense_bytes + self.res.streamed_experts * self.res.expert_bytes * use
        else:
            n_used = zero
            weight_bytes = zero + self.res.streamed_dense_bytes
        mb = max(1, min(k.attn_micro_batch, k.wave))
        # Slots whose KV a step reads: each micro-batch's span of live slots. Sequences admitted together
        # take adjacent slots and finish together, freeing them together, so live slots stay packed and
        # the spans cover about the live sequences alone.
        covered = np.minimum(k.wave, decode)
        # The attention backend's part: KV over the link, new K/V stored back, the product's time.
        att = self.attention.step_terms(self, decode, T, covered, ctx_mean, zero)
        kv_h2d = att.kv_link_bytes

        # ---- device compute ---------------------------------------------------------------------
        flops = 2 * T * (w.attn_proj * L)
        gpu = flops / g(T)
        launches = L * (30 + 20 * np.ceil(covered / mb)) + 12 * w.dense_layers + 8 * admitted * L
        gpu, flops, launches = self._ffn_compute(T, n_used, gpu, flops, launches)
        gpu = gpu + self._expansion_s(T, n_used)
        head_flops = 2 * S * w.head
        head_s = head_flops / g(np.maximum(S, 1))
        flops = flops + head_flops
        # Attention: decode as the backend says (on the GPU or the CPU); prefill is a padded square per
        # prompt (the masked product computes all of it).
        cpu_attn = att.cpu_s
        gpu = gpu + att.gpu_s
        sq = admitted * prompt_len * prompt_len
        f = 4 * spec.q_size * sq * L
        gpu = gpu + f / hw.gemm_rate(prompt_len) + 2 * 4 * spec.num_heads * sq * L / hw.mem_bytes_s
        flops = flops + f
        gpu = gpu + T * (spec.hidden_size * dsize * 24 * L) / hw.mem_bytes_s  # norms, rope, residuals
        gpu = np.maximum(gpu, launches * hw.host.launch_s + att.issue_s)

        # ---- serial parts of the chain ---------------------------------------------------------------
        serial = zero + w.moe_layers * hw.host.sync_s
        for part in att.serial:  # the backend's waits in the chain (CPU attention: q over, output back)
            serial = serial + part
        kv_copy = att.kv_copy_s
        kv_store = att.kv_store_s
        if self.hybrid is not None and not getattr(self, "_dense_only", False):
            from offbatch.planner.hybrid_ffn import host_cold_rate

            # Small steps: the hybrid layers' FFN modules are not streamed; their cold part is host work in the chain.
            weight_bytes, serial = self.hybrid.adjust(T, weight_bytes, serial, host_cold_rate(hw),
                                                      getattr(self, "_fetch_tokens", None))
        # A split stream: this rank's link carries its chunk of each module; the all-gather brings the
        # others' over the GPUs' interconnect, on a stream of its own beside the copies.
        gather = weight_bytes * (self.split - 1) / self.split / hw.peer_rate
        weight_bytes = weight_bytes / self.split
        copy = (weight_bytes + kv_h2d) / hw.h2d_pinned_bytes_s
        chain = gpu + cpu_attn + kv_copy + serial
        host = (hw.host.step_s + hw.host.seq_s * S + admitted * (prompt_len * hw.host.prefill_token_s)
                + L * np.ceil(covered / mb) * hw.host.attn_call_s
                + T * self.embed_row * (1 / hw.h2d_pageable_bytes_s + 1 / hw.host.cpu_attn_bytes_s))
        # The disk tier's reads run on the reader thread, ahead of the copies, as far as the staging
        # buffers allow: in a steady state the slower of disk and link sets the pace.
        disk = weight_bytes * self.disk_fraction / hw.host.disk_read_bytes_s
        # The copy stream runs only as far ahead as the slot rings reach (a few modules): the compute of a
        # resident stretch at the start of a step hides one ring fill of copies, no more, and the rest of
        # it adds to the overlapped part instead of hiding under the copies.
        exposed = (np.maximum(0.0, (gpu + serial) * self.lead_share - self.ring_fill_s)
                   if self.overlap and self.streams else zero)
        # Copies are issued from the host thread, at most a set of slot rings ahead of the compute: while
        # that thread computes a layer's attention on the CPU, the copy stream stops once the rings are
        # full. What CPU attention of a layer takes beyond a ring fill holds the copies back, resident
        # layer or streamed.
        if self.cpu_attn and self.overlap and self.streams:
            exposed = exposed + L * np.maximum(0.0, cpu_attn / L - self.ring_fill_s)
        if self.overlap:
            # The copy stream and the compute chain each wait for the other now and then (a copy for its
            # slot, a module for its copy), and the rings hold only a few modules: where their loads are
            # close, the step takes longer than the larger of them. A p-norm stands for that (p = inf
            # would be perfect overlap). KV copied on the compute stream counts in both once, outside.
            both = kv_copy
            a, b = copy + head_s - both, np.maximum(chain - exposed - both, 0.0)
            hi = np.maximum(np.maximum(a, b), 1e-12)
            overlapped = hi * (1.0 + (np.minimum(a, b) / hi) ** OVERLAP_P) ** (1 / OVERLAP_P) + both
            total = np.maximum(np.maximum(overlapped, gather), np.maximum(disk, kv_store)) + exposed + host
        else:
            total = copy + chain + disk + host
        return {"total": total, "copy": copy, "disk": disk, "gpu": gpu, "cpu_attn": cpu_attn, "kv_copy": kv_copy, "serial": serial,
                "host": host, "weight_bytes": weight_bytes, "kv_bytes": kv_h2d, "flops": flops, "T": T, "S": S}

    def _ffn_compute(self, T, n_used, gpu, flops, launches):
        """The FFN layers' device time, FLOPs and launches (dense layers, then MoE: router, experts,
        shared expert, the gather and scatter of expert rows), added to the step's running sums."""
        hw, w, k = self.hw, self.work, self.knobs
        g = hw.gemm_rates
        spec, dsize = self.shape.spec, self.shape.dsize
        if w.dense_layers:
            f = 2 * T * (w.ffn * w.dense_layers)
            gpu = gpu + f / g(np.minimum(T, k.ffn_micro_tokens))
            flops = flops + f
        if w.moe_layers:
            f = 2 * T * (w.router * w.moe_layers)
            per_expert = T * w.top_k / np.maximum(n_used, 1e-9)
            f2 = 2 * T * (w.top_k * w.expert * w.moe_layers)
            gpu = gpu + f / g(T) + f2 / g(np.minimum(per_expert, k.ffn_micro_tokens))
            flops = flops + f + f2
            if w.shared:
                f3 = 2 * T * (w.shared * w.moe_layers)
                gpu = gpu + f3 / g(np.minimum(T, k.ffn_micro_tokens))
                flops = flops + f3
            launches = launches + w.moe_layers * (12 + 9 * n_used)
            # Gathering each expert's rows and adding its output back (index_add_, atomic in bf16).
            gpu = gpu + T * (w.top_k * spec.hidden_size * w.moe_layers) * (4 * dsize / hw.mem_bytes_s + 1 / hw.scatter_elems_s)
        return gpu, flops, launches

    def _expansion_s(self, T, n_used):
        """Expanding compressed weights on the device (planner's view of WeightFormat.expands): each use of
        a module whose micro-batch is too large for the fused dequant-GEMM reads its stored bytes and
        writes the dense ones; the GEMM that follows is priced as dense."""
        if not self.expand:
            return 0.0
        fused, micro, w = self.fmt.fused_rows, self.knobs.ffn_micro_tokens, self.work
        rate = self.hw.mem_bytes_s
        t = np.where(T > fused, self.expand.get("attn", 0.0) * self.L, 0.0)
        experts = 0.0
        if w.dense_layers:
            rows = np.minimum(T, micro)
            t = t + np.where(rows > fused, self.expand.get("ffn", 0.0) * w.dense_layers * np.ceil(T / micro), 0.0)
        if w.moe_layers:
            per_expert = T * w.top_k / np.maximum(n_used, 1e-9)
            experts = np.where(np.minimum(per_expert, micro) > fused, self.expand.get("expert", 0.0) * n_used * w.moe_layers, 0.0)
            if w.shared:
                t = t + np.where(np.minimum(T, micro) > fused, self.expand.get("shared", 0.0) * w.moe_layers, 0.0)
        return t / (rate * self.fmt.expand_efficiency) + experts / (rate * self.fmt.expert_expand_efficiency)

    def hybrid_wins(self, tokens: int) -> bool:
        """Whether a decode step of `tokens` sequences (context: the plan's half) is faster with the hybrid FFN
        (its cold path as the plan has it)."""
        ctx = self.max_len / 2
        hybrid = float(self.times(tokens, 0, 0.0, ctx, ctx)["total"])
        return hybrid < self.hybrid_times(tokens)[0]

    def hybrid_times(self, tokens: int) -> tuple[float, float, float]:
        """A decode step of `tokens` sequences (context: the plan's half): (dense FFN, hybrid with the cold
        neurons on the host threads, hybrid with them fetched to the device) seconds."""
        ctx = self.max_len / 2
        out = []
        for dense_only, fetch in ((True, None), (False, 0), (False, 1)):
            self._dense_only, self._fetch_tokens = dense_only, fetch
            try:
                out.append(float(self.times(tokens, 0, 0.0, ctx, ctx)["total"]))
            finally:
                self._dense_only, self._fetch_tokens = False, None
        return out[0], out[1], out[2]

    def step(self, decode: float, admitted: float, prompt_len: float, ctx_mean: float, ctx_max: float) -> StepTime:
        t = {k: float(v) for k, v in self.times(decode, admitted, prompt_len, ctx_mean, ctx_max).items()}
        return StepTime(t["total"], t["copy"], t["gpu"], t["cpu_attn"], t["kv_copy"], t["serial"], t["host"],
                        t["weight_bytes"], t["kv_bytes"], t["flops"], int(t["T"]), int(t["S"]), t["disk"])

    def floor_s(self, st: StepTime) -> float:
        """The physical floor of a step, as `bench` computes it: streamed bytes over the pinned copy
        rate, or FLOPs over the GEMM rate at the step's M, whichever is larger."""
        return max(st.weight_bytes / self.hw.h2d_pinned_bytes_s, st.flops / self.hw.gemm_rate(max(st.tokens, 1)))


# ---- the whole job ----------------------------------------------------------------------------------
@dataclass
class JobTime:
    total_s: float
    prefill_s: float  # steps that admitted prompts
    decode_s: float  # steps that only decoded
    prompt_tokens: float
    generated_tokens: float
    decode_tokens: float  # generated in decode-only steps
    steps: int
    prefill_steps: int

    @property
    def e2e_tok_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def admits_per_step(prefill_tokens: int, prompt_len: float) -> int:
    """Prompts the engine admits per step: the first always, then while they fit the token budget."""
    return max(1, int(prefill_tokens // max(prompt_len, 1)))


MAX_COHORTS = 16


@dataclass(frozen=True)
class Schedule:
    """The engine's admission loop for one job shape, wave and admission rate, in runs of identical
    steps: what each run decodes and admits, and how often it repeats. Prices follow from a StepModel."""

    decode: np.ndarray
    admitted: np.ndarray
    ctx_mean: np.ndarray
    ctx_max: np.ndarray
    mult: np.ndarray
    steps: int
    prefill_steps: int
    decode_tokens: float  # generated in decode-only steps


@lru_cache(maxsize=4096)
def schedule(n: int, prompt_len: float, gen: int, wave: int, per_step: int) -> Schedule:
    """Steps of the engine's admission loop, in runs: consecutive steps of the same kind (admitting the
    same number, or only decoding) until a cohort finishes are priced once at their middle. Sequences
    admitted together form a cohort; at most MAX_COHORTS live at once (the closest in age merge and
    finish together at their mean age), so a long job costs a bounded number of runs per wave cycle."""
    per_step = min(per_step, wave)
    cohorts: list[list[float]] = []  # [count, age] oldest first; age = tokens generated
    pending, live, age_sum = n, 0, 0.0  # age_sum: sum of count * age over live cohorts
    rows = []
    steps = pre_steps = 0
    dec_tokens = 0.0
    while pending or live:
        free = wave - live
        a = min(per_step, free, pending)
        oldest = cohorts[0][1] if live else 0.0
        room = max(1, math.ceil(gen - oldest)) if live else 1 << 30
        ages = age_sum / live if live else 0.0
        if a == 0:
            m = room
            mid = (m - 1) / 2
            rows.append((live, 0, prompt_len + ages + mid, prompt_len + oldest + mid, m))
            dec_tokens += live * m
        else:
            m = max(1, min(free // a, pending // a, room))
            mid = (m - 1) / 2
            rows.append((live + a * mid, a, prompt_len + ages + mid, prompt_len + oldest + mid, m))
            pre_steps += m
        steps += m
        for c in cohorts:  # every live cohort ages by m
            c[1] += m
        age_sum += live * m
        if a:
            # Cohorts of one run finish one after another, as they were admitted: keep up to 8 of them.
            parts = min(m, 8)
            for j in range(parts):
                lo, hi = m * j // parts, m * (j + 1) // parts  # steps [lo, hi) of the run
                count, age = a * (hi - lo), m - (lo + hi - 1) / 2
                cohorts.append([count, age])
                age_sum += count * age
            pending -= a * m
            live += a * m
        while cohorts and cohorts[0][1] >= gen - 1e-9:
            count, age = cohorts.pop(0)
            live -= count
            age_sum -= count * age
        while len(cohorts) > MAX_COHORTS:  # merge the two closest in age (count-weighted mean)
            gaps = [x[1] - y[1] for x, y in zip(cohorts, cohorts[1:])]
            j = gaps.index(min(gaps))
            (c1, g1), (c2, g2) = cohorts[j], cohorts[j + 1]
            cohorts[j:j + 2] = [[c1 + c2, (c1 * g1 + c2 * g2) / (c1 + c2)]]
    cols = np.array(rows, dtype=np.float64).T
    return Schedule(cols[0], cols[1], cols[2], cols[3], cols[4], steps, pre_steps, dec_tokens)


def _price(model: StepModel, sched: Schedule, prompt_len: float) -> tuple[float, float]:
    """(seconds of admitting steps, seconds of decode-only steps)."""
    t = model.times(sched.decode, sched.admitted, prompt_len, sched.ctx_mean, sched.ctx_max)["total"] * sched.mult
    pre = sched.admitted > 0
    return float(t[pre].sum()), float(t[~pre].sum())


def job_time(model: StepModel, workload: Workload) -> JobTime:
    """The whole job. Long jobs are simulated in part and extended at their steady-state rate."""
    gen = max(1, round(workload.gen_len))
    p = workload.prompt_len
    n = workload.num_requests
    per_step = admits_per_step(model.knobs.prefill_tokens, p)
    # Enough requests to reach the steady state twice over: four times the concurrency the engine keeps
    # (the wave, or fewer when admission at `per_step` cannot keep it full).
    chunk = max(4 * min(model.knobs.wave, per_step * gen), 4 * per_step, 32)
    if n <= 2 * chunk:
        s = schedule(n, p, gen, model.knobs.wave, per_step)
        pre, dec = _price(model, s, p)
        return JobTime(pre + dec, pre, dec, n * p, n * gen, s.decode_tokens, s.steps, s.prefill_steps)
    a, b = schedule(chunk, p, gen, model.knobs.wave, per_step), schedule(2 * chunk, p, gen, model.knobs.wave, per_step)
    (pa, da), (pb, db) = _price(model, a, p), _price(model, b, p)
    scale = (n - 2 * chunk) / chunk

    def ext(x, y):
        return y + (y - x) * scale

    pre, dec = ext(pa, pb), ext(da, db)
    return JobTime(pre + dec, pre, dec, n * p, n * gen, ext(a.decode_tokens, b.decode_tokens),
                   round(ext(a.steps, b.steps)), round(ext(a.prefill_steps, b.prefill_steps)))
