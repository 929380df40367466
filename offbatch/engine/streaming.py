"""The streaming engine: module-based batching over a wave of sequences (MoE-Gen's execution model).

Every step runs one token for each running sequence plus the prompts of newly admitted ones, layer
by layer; each module (attention, dense FFN, each expert) runs once over all of the step's tokens,
while the next modules' weights stream into spare device slots on a copy stream. KV of the wave
stays on the compute device or, when the plan says so, in pinned host memory (new K/V go there through
a writer thread). Finished sequences leave at once and waiting ones take their KV slots.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from offbatch.attention.wave import DecodeBatch, decode_attention, decode_batch, prefill_attention
from offbatch.engine import sampler
from offbatch.engine.api import GenOutput, GenRequest, GenStats
from offbatch.engine.experts import GroupedExperts, expert_items
from offbatch.engine.sequence import SeqState, sample_step
from offbatch.models import layers as L
from offbatch.offload.kv import WaveKV
from offbatch.offload.kv_writer import KV_STAGING_BUFFERS, HostKVWriter
from offbatch.offload.prefetch import Prefetcher
from offbatch.offload.weights import ModuleKey, WeightStore
from offbatch.plan import Plan
from offbatch.planner.shape import use_order


@dataclass
class LiveSeq(SeqState):
    slot: int = -1  # the sequence's KV slot in the wave
    length: int = 0  # tokens in the KV cache


@dataclass
class StepTimes:
    steps: int = 0
    wall_s: float = 0.0
    weight_wait_s: float = 0.0  # compute stream stalled on a copy (device-side, from events)
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_wall_s: float = 0.0
    decode_tokens: int = 0
    prefill_wall_s: float = 0.0
    prefill_tokens: int = 0
    # Host time blocked (wall clock, both step kinds): where the host thread, which also issues the copies,
    # could not run ahead of the device.
    router_sync_s: float = 0.0  # waiting for each MoE layer's routing counts
    cpu_attention_s: float = 0.0  # decode attention on the host threads (q over, output back included)
    prefill_router_sync_s: float = 0.0  # of them, in steps that admitted prompts
    prefill_cpu_attention_s: float = 0.0


class StreamingEngine:
    def __init__(self, store: WeightStore, plan: Plan, eos_token_ids: Iterable[int] = (), timing: bool = False):
        self.spec = store.spec
        self.plan = plan
        self.device = torch.device(plan.device)
        self.dtype = store.dtype
        self.store = store
        self.eos_ids = tuple(eos_token_ids)
        self.pf = Prefetcher(store, self.device, plan.slots, plan.resident, plan.staging_buffers)
        # Routed experts through the grouped kernels when they are gated SiLU (None: per-expert loop).
        # OFFBATCH_GROUPED_EXPERTS=0 falls back to one launch per expert (an escape hatch, and a baseline).
        items = expert_items(self.spec, store) if os.environ.get("OFFBATCH_GROUPED_EXPERTS", "1") != "0" else None
        self.experts = GroupedExperts(self.spec, store, self.pf, self.device, items) if items else None
        # The wave's KV: on the compute device, or in (pinned) host memory when the plan says so.
        host_kv = plan.kv_placement == "host" and self.device.type != "cpu"
        kv_device = torch.device("cpu") if host_kv else self.device
        self.kv = WaveKV(self.spec, plan.wave_size, plan.max_len, kv_device, self.dtype, pin=host_kv)
        self.attn_device = kv_device if host_kv and plan.decode_attention == "cpu" else self.device
        if host_kv:  # new K/V reach host KV through a copy stream and a writer thread
            rows = max(plan.prefill_tokens, plan.max_len) + plan.wave_size  # a step's tokens at most (memory.step_tokens)
            self.kv.writer = HostKVWriter(self.kv, rows, KV_STAGING_BUFFERS)
        self.inv_freq = L.rope_inv_freq(self.spec).to(self.device) if self.spec.positions == "rope" else None
        self.embed_host = store.host_views((-1, "embed"))
        self.stats = GenStats()
        self.times = StepTimes()
        # Per step, beside pf.stats.per_step_bytes: (KV bytes decode attention read, of them copied to the device).
        self.kv_step_bytes: list[tuple[int, int]] = []
        self._kv_mark = (0, 0)
        self.step_kinds: list[str] = []  # "prefill" or "decode", one per step, beside pf.stats.per_step_bytes
        self.timing = timing and self.device.type == "cuda"
        self._wait_events: list = []
        self._blocked_mark = (0.0, 0.0)  # host-blocked totals at the start of the step (prefill share)
        self._post_norms: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    # ---- one step over the wave ------------------------------------------
    def _schedule_step(self) -> None:
        # One definition of the step's module order, shared with the planner's cost model.
        self.pf.schedule(use_order(self.spec, self.store.keys()))

    def _acquire(self, key: ModuleKey) -> dict[str, torch.Tensor]:
        if not self.timing or self.pf.is_resident(key):
            return self.pf.acquire(key)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        w = self.pf.acquire(key)
        after.record()
        self._wait_events.append((before, after))
        return w

    def _embed(self, ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        # The embedding table stays in host memory: a row gather there moves T*H bytes, not V*H.
        g = self.embed_host
        x = F.embedding(torch.tensor(ids, dtype=torch.long), g["embed"])
        if "project_in" in g:
            x = F.linear(x, g["project_in"])
        if self.spec.positions == "learned":
            x = x + F.embedding(positions.cpu() + 2, g["pos_embed"])
        return x.to(self.device, non_blocking=True)

    def _attention(self, i: int, x: torch.Tensor, dec: DecodeBatch | None, pre: list[tuple[LiveSeq, int]],
                   cos, sin) -> torch.Tensor:
        spec = self.spec
        w = self._acquire((i, "attn"))
        h = L.norm(x, w, "attn_norm", spec) if spec.pre_norm else x
        q, k, v = L.attention_qkv(h, w, spec, cos, sin)
        out = torch.empty_like(q)
        nd = len(dec.slots) if dec else 0
        if nd:
            t0 = time.perf_counter()
            out[:nd] = decode_attention(self.kv, i, q[:nd], k[:nd], v[:nd], dec, spec.sliding_window)
            if self.attn_device.type == "cpu" and self.device.type != "cpu":
                self.times.cpu_attention_s += time.perf_counter() - t0
        if pre:
            seqs = [(s.slot, n) for s, n in pre]
            out[nd:] = prefill_attention(self.kv, i, q[nd:], k[nd:], v[nd:], seqs, list(self._prefill_groups(pre)),
                                         spec.sliding_window)
        y = L.attention_output(out, w)
        self.pf.release((i, "attn"))
        return y

    def _prefill_groups(self, pre: list[tuple[LiveSeq, int]]):
        """Indices of prefill sequences attended together: calls whose float32 scores stay within
        plan.score_bytes and at most attn_micro_batch sequences."""
        spec, plan = self.spec, self.plan
        group: list[int] = []
        tmax = 0
        for j, (s, n) in enumerate(pre):
            t = max(tmax, n)
            if group and (len(group) + 1 > plan.attn_micro_batch or
                          (len(group) + 1) * spec.num_heads * t * t * 4 > plan.score_bytes):
                yield group
                group, t = [], n
            group.append(j)
            tmax = t
        if group:
            yield group

    def _mlp_chunked(self, h: torch.Tensor, w, prefix: str = "") -> torch.Tensor:
        step = self.plan.ffn_micro_tokens
        if h.shape[0] <= step:
            return L.mlp(h, w, self.spec, prefix)
        return torch.cat([L.mlp(h[a : a + step], w, self.spec, prefix) for a in range(0, h.shape[0], step)])

    def _ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if not spec.is_moe_layer(i):
            w = self._acquire((i, "ffn"))
            h = L.norm(x, w, "ffn_norm", spec) if spec.pre_norm else x
            y = self._mlp_chunked(h, w)
            self.pf.release((i, "ffn"))
            return y
        wr = self._acquire((i, "router"))
        h = L.norm(x, wr, "ffn_norm", spec)
        top_w, top_i = L.route(h, wr, spec)
        order, counts = L.group_by_expert(top_i, spec.moe.num_experts)
        t0 = time.perf_counter()
        counts = counts.tolist()  # the one host sync of a MoE layer: which experts to fetch
        self.times.router_sync_s += time.perf_counter() - t0
        self.pf.unschedule({(i, f"expert.{e}") for e, n in enumerate(counts) if n == 0})
        y = torch.zeros_like(h)
        if spec.moe.shared_expert_intermediate_size:
            ws = self._acquire((i, "shared"))
            y += self._shared(h, ws)
            self.pf.release((i, "shared"))
        flat_w = top_w.reshape(-1)
        if self.experts is not None:
            self.experts.run(i, h, order, counts, flat_w, y, self._acquire, self.plan.ffn_micro_tokens)
            return y
        k = spec.moe.top_k
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start : start + n]
            start += n
            rows = sel // k
            we = self._acquire((i, f"expert.{e}"))
            y.index_add_(0, rows, self._mlp_chunked(h[rows], we, f"experts.{e}.") * flat_w[sel, None])
            self.pf.release((i, f"expert.{e}"))
        return y

    def _shared(self, h, ws):
        step = self.plan.ffn_micro_tokens
        return torch.cat([L.shared_expert(h[a : a + step], ws, self.spec) for a in range(0, h.shape[0], step)])

    def _layer(self, i, x, dec, pre, cos, sin):
        spec = self.spec
        if spec.pre_norm:
            x = x + self._attention(i, x, dec, pre, cos, sin)
            return x + self._ffn(i, x)
        # Post-norm (OPT-350m): normalise after each residual add.
        a = self._attention(i, x, dec, pre, cos, sin)
        x = L.norm(x + a, self._norm_weights(i, "attn"), "attn_norm", spec)
        f = self._ffn(i, x)
        return L.norm(x + f, self._norm_weights(i, "ffn"), "ffn_norm", spec)

    def _norm_weights(self, i: int, module: str) -> dict[str, torch.Tensor]:
        # Post-norm needs a module's norm after the module was released: keep a device copy of the
        # (tiny) norm tensors per layer.
        cache = self._post_norms
        if (i, module) not in cache:
            host = self.store.host_views((i, module))
            cache[(i, module)] = {k: t.to(self.device) for k, t in host.items() if "norm" in k}
        return cache[(i, module)]

    @torch.inference_mode()
    def step(self, dec: list[LiveSeq], pre: list[tuple[LiveSeq, int]]) -> torch.Tensor:
        """dec: sequences decoding one token (their last generated one); pre: (sequence, n) running the
        next n prompt tokens. Returns float32 logits of each sequence's last new token, dec then pre."""
        if any(s.length for s, _ in pre):
            raise ValueError("prefill runs whole prompts of fresh sequences")
        ids, pos = [], []
        for s in dec:
            ids.append(s.generated[-1])
            pos.append(s.length)
        for s, n in pre:
            ids += s.req.prompt_ids[s.length : s.length + n]
            pos += range(s.length, s.length + n)
        positions = torch.tensor(pos, dtype=torch.long)
        x = self._embed(ids, positions)
        positions = positions.to(self.device, non_blocking=True)
        cos = sin = None
        if self.inv_freq is not None:
            cos, sin = L.rope_cos_sin(self.inv_freq, positions, self.dtype)
        self._schedule_step()
        batch = decode_batch(self.kv, [s.slot for s in dec], [s.length for s in dec], self.plan.attn_micro_batch,
                             self.attn_device) if dec else None
        for i in range(self.spec.num_layers):
            x = self._layer(i, x, batch, pre, cos, sin)
        last = list(range(len(dec)))
        row = len(dec)
        for _, n in pre:
            row += n
            last.append(row - 1)
        xl = x[torch.tensor(last, device=self.device)]
        wh = self._acquire((-1, "head"))
        if self.spec.final_norm:
            xl = L.norm(xl, wh, "final_norm", self.spec)
        if "project_out" in wh:
            xl = F.linear(xl, wh["project_out"])
        logits = F.linear(xl, wh["lm_head"]).float()
        self.pf.release((-1, "head"))
        self.pf.end_step()
        self.kv_step_bytes.append((self.kv.read_bytes - self._kv_mark[0], self.kv.copied_bytes - self._kv_mark[1]))
        self._kv_mark = (self.kv.read_bytes, self.kv.copied_bytes)
        for s in dec:
            s.length += 1
        for s, n in pre:
            s.length += n
        return logits

    # ---- the wave loop ---------------------------------------------------
    def _admit(self, pending: Iterator[GenRequest], waiting: list[GenRequest], live: list[LiveSeq]):
        """New sequences for this step, within free KV slots and the step's prompt-token budget."""
        new, budget = [], self.plan.prefill_tokens
        while self.kv.free:
            req = waiting.pop() if waiting else next(pending, None)
            if req is None:
                break
            n = len(req.prompt_ids)
            if n + 1 > self.plan.max_len:
                raise ValueError(f"request {req.key}: prompt of {n} tokens exceeds the planned context {self.plan.max_len}")
            if new and n > budget:
                waiting.append(req)
                break
            budget -= n
            new.append(LiveSeq(req, sampler.make_rng(req.params, req.key), slot=self.kv.allocate()))
            if budget <= 0:
                break
        return new

    def generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        try:
            yield from self._generate(requests)
        finally:
            try:
                self.kv.drain()  # host KV writes of the last step (and any writer error) before returning
            finally:
                if self.kv.writer is not None:
                    self.kv.writer.close()  # its thread would keep the host KV alive after the engine

    def close(self) -> None:
        """End the engine's threads (disk reader, host KV writer): call once done with it."""
        self.pf.close()
        if self.kv.writer is not None:
            self.kv.writer.close()

    def _generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        pending = iter(requests)
        waiting: list[GenRequest] = []
        live: list[LiveSeq] = []
        while True:
            new = self._admit(pending, waiting, live)
            if not live and not new:
                return
            t0 = time.perf_counter()
            self._wait_events.clear()
            self._blocked_mark = (self.times.router_sync_s, self.times.cpu_attention_s)
            logits = self.step(live, [(s, len(s.req.prompt_ids)) for s in new])
            step = live + new
            picks = sample_step(logits, step, self.eos_ids)  # host sync: the step is done
            self._account(time.perf_counter() - t0, len(step), sum(len(s.req.prompt_ids) for s in new))
            live = []
            now = time.perf_counter()
            for s, pick in zip(step, picks):
                room = min(self.plan.max_len, self.spec.max_position) - s.length - 1
                out = s.advance(pick, self.eos_ids, room, now)
                if out is None:
                    live.append(s)
                else:
                    self.kv.release(s.slot)
                    yield out

    def _account(self, wall: float, n_sampled: int, n_prompt: int) -> None:
        t = self.times
        t.steps += 1
        t.wall_s += wall
        if self._wait_events:
            t.weight_wait_s += sum(a.elapsed_time(b) for a, b in self._wait_events) / 1000
        self.step_kinds.append("prefill" if n_prompt else "decode")
        if n_prompt:
            sync0, attn0 = self._blocked_mark
            t.prefill_router_sync_s += t.router_sync_s - sync0
            t.prefill_cpu_attention_s += t.cpu_attention_s - attn0
            t.prefill_steps += 1
            t.prefill_wall_s += wall
            t.prefill_tokens += n_prompt
        else:
            t.decode_steps += 1
            t.decode_wall_s += wall
            t.decode_tokens += n_sampled
        self.stats.prompt_tokens += n_prompt
        self.stats.generated_tokens += n_sampled
        if self.device.type == "cuda":
            self.stats.peak_gpu_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
