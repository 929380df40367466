"""The streaming engine: module-based batching over a wave of sequences (MoE-Gen's execution model).

Every step runs one token for each running sequence plus the prompts of newly admitted ones, layer
by layer; each module (attention, dense FFN, each expert) runs once over all of the step's tokens,
while the next modules' weights stream into spare device slots on a copy stream. The wave scheduler
(scheduler.py) picks each step's sequences; the forward (forward.py) runs them through the attention
backend the plan names (where the wave's KV lives and where decode attention runs) and the FFN
backends (dense, MoE grouped or per expert).
"""

from __future__ import annotations

import time

from collections.abc import Iterable

import torch

from offbatch.attention import get_attention
from offbatch.engine.forward import Forward, embed, prefill_groups
from offbatch.engine.modules import StreamedModules
from offbatch.engine.scheduler import LiveSeq, StepTimes, WaveScheduler
from offbatch.ffn import GroupedMoE, HybridFFN, build_ffns, layer_modules
from offbatch.models import layers as L
from offbatch.models.catalogue import step_order
from offbatch.offload.kv import kv_format
from offbatch.offload.prefetch import Prefetcher
from offbatch.offload.weights import WeightStore
from offbatch.plan import Plan

__all__ = ["LiveSeq", "StepTimes", "StreamingEngine"]


class StreamingEngine(WaveScheduler):
    def __init__(self, store: WeightStore, plan: Plan, eos_token_ids: Iterable[int] = (), timing: bool = False,
                 neurons=None, key_scales=None, group=None):
        """neurons: the model's activity statistics and predictors (ffn.neurons.NeuronStats), for a plan
        whose dense FFN layers are hybrid. group: a ShardGroup (offload/shard_group.py) whose ranks split
        the weight stream; this engine runs its rank's sequences."""
        device = torch.device(plan.device)
        super().__init__(store.spec, plan, device, eos_token_ids)
        spec = self.spec
        self.dtype = store.dtype
        self.store = store
        if group is not None and plan.dense_ffn == "hybrid":
            raise ValueError("a split weight stream runs dense FFN layers (the hybrid FFN streams a step's modules "
                             "by its size, which differs between ranks)")
        self.group = group
        t0 = time.perf_counter()
        self.pf = Prefetcher(store, self.device, plan.slots, plan.resident, plan.staging_buffers, group=group)
        resident_s = time.perf_counter() - t0
        self.timing = timing and self.device.type == "cuda"
        self.mods = StreamedModules(store, self.pf, self.device, self.timing)
        self.ffns = build_ffns(spec, self.mods, plan.ffn_micro_tokens, plan.moe_ffn, self.dtype)
        self.hybrid = None
        if plan.dense_ffn == "hybrid":
            if neurons is None:
                from offbatch.errors import OffbatchError

                raise OffbatchError("the plan's FFN is hybrid: give the model's neuron statistics and predictors")
            self.hybrid = HybridFFN(spec, self.mods, plan.ffn_micro_tokens, store=store, neurons=neurons,
                                    hot_neurons=plan.hot_neurons, hybrid_tokens=plan.hybrid_tokens,
                                    resident=plan.resident, device=self.device, dtype=self.dtype,
                                    fetch_tokens=plan.hybrid_fetch_tokens)
            self.ffns[False] = self.hybrid
        moe = self.ffns.get(True)
        # The grouped MoE backend (kernels, launches: tests and stats read them); None otherwise.
        self.experts = moe if isinstance(moe, GroupedMoE) else None
        # Where the wave's KV lives and where decode attention runs (offbatch/attention).
        t0 = time.perf_counter()
        self.attention = get_attention(plan.attention)(spec, plan, self.device, self.dtype)
        # Where the start-up went (`run` prints it with the load time): the weights into host memory (their
        # buffers allocated and pinned, then read), the resident ones and the slots onto the device, the KV.
        self.startup = {**getattr(store, "load_stats", {}), "resident_s": resident_s, "kv_s": time.perf_counter() - t0}
        self.kv = self.attention.kv  # the wave's KV store
        self.slots = self.attention
        # Balanced keys only where the plan stores K compressed: with exact KV they would change nothing but
        # the rounding (the exact path stays the reference's).
        self.key_scales = key_scales if key_scales is not None and kv_format(plan.kv_format, self.dtype).lossy else None
        if self.key_scales is not None:
            self.key_scales.check(spec)
        self.forward = Forward(spec, self.mods, self.attention, self.ffns, self.key_scales)
        # The step's module order: every layer's modules as its backends declare them, then the head.
        self.order = step_order(spec.num_layers, store.keys(),
                                layer_modules(spec, moe.name if moe else None, self.attention))
        # A small step of a hybrid plan computes its FFN layers from hot neurons and the host: their modules
        # are not streamed then.
        hybrid_layers = set(self.hybrid.layers) if self.hybrid is not None else set()
        self.order_hybrid = [k for k in self.order if not (k[1] == "ffn" and k[0] in hybrid_layers)]
        self.inv_freq = L.rope_inv_freq(spec).to(self.device) if spec.positions == "rope" else None
        self.embed_host = store.host_views((-1, "embed"))
        # Per step, beside pf.stats.per_step_bytes: (KV bytes decode attention read, of them copied to the device).
        self.kv_step_bytes: list[tuple[int, int]] = []
        self._kv_mark = (0, 0)

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
        # The embedding table stays in host memory: a row gather there moves T*H bytes, not V*H.
        x = embed(self.spec, self.embed_host, torch.tensor(ids, dtype=torch.long), positions)
        x = x.to(self.device, non_blocking=True)
        positions = positions.to(self.device, non_blocking=True)
        cos = sin = None
        if self.inv_freq is not None:
            cos, sin = L.rope_cos_sin(self.inv_freq, positions, self.dtype)
        plan = self.plan
        hybrid = self.hybrid is not None and len(ids) <= plan.hybrid_tokens
        if self.hybrid is not None:
            self.hybrid.use_hybrid = hybrid
        self.mods.schedule(self.order_hybrid if hybrid else self.order)
        groups = list(prefill_groups([n for _, n in pre], self.spec.num_heads, plan.attn_micro_batch, plan.score_bytes))
        step = self.attention.begin_step([s.slot for s in dec], [s.length for s in dec],
                                         [(s.slot, n) for s, n in pre], groups)
        x = self.forward.layers(x, step, cos, sin)
        last = list(range(len(dec)))
        row = len(dec)
        for _, n in pre:
            row += n
            last.append(row - 1)
        logits = self.forward.head(x[torch.tensor(last, device=self.device)])
        self.mods.pass_until(None)
        self.pf.end_step()
        kv = self.attention
        self.kv_step_bytes.append((kv.read_bytes - self._kv_mark[0], kv.copied_bytes - self._kv_mark[1]))
        self._kv_mark = (kv.read_bytes, kv.copied_bytes)
        for s in dec:
            s.length += 1
        for s, n in pre:
            s.length += n
        return logits

    @torch.inference_mode()
    def _idle_step(self) -> None:
        """Every module of the step passes over (this rank's chunk copied, the others' gathered), in the
        order a working rank's step fetches them."""
        self.mods.schedule(self.order)
        for key in self.order:
            self.pf.pass_over(key)
        self.pf.end_step()

    # ---- what the scheduler reads --------------------------------------------------------------
    def blocked_s(self) -> tuple[float, float]:
        sync = sum(getattr(f, "sync_s", 0.0) for f in self.ffns.values())
        return sync, self.attention.host_blocked_s

    def weight_wait_s(self) -> float:
        return self.mods.wait_s()

    def _begin_step(self) -> None:
        self.mods.wait_events.clear()

    def _end_generate(self) -> None:
        try:
            self.attention.drain()  # host KV writes of the last step (and any writer error) before returning
        finally:
            self.attention.close()  # its writer thread would keep the host KV alive after the engine

    def close(self) -> None:
        """End the engine's threads (disk reader, host KV writer): call once done with it."""
        self.pf.close()
        self.attention.close()
        if self.hybrid is not None:
            self.hybrid.close()
