"""hgca: hybrid GPU-CPU attention (the seed paper "HGCA: Hybrid GPU-CPU Attention for Long Context LLM
Inference"). The wave's whole KV lives in host memory (in the plan's KV format); each sequence's first
few keys ("sinks") and its most recent `window` keys are also kept on the GPU. A decode query attends
the GPU part exactly, and the older keys in host memory sparsely on the CPU threads (per query head,
the top-k keys by score: only their values are read); the two partial attentions merge by log-sum-exp.
Only q and the CPU half's output cross the link; the GPU never reads the old KV.

The GPU part is a small store of sinks + window positions per slot: position p < sinks sits at p, a
later one at sinks + (p - sinks) % window (a ring), so the valid entries of a sequence are always a
prefix of its slot and attention over them needs no positions (keys carry their rotary phase).

Lossy (unless top-k covers every older key): chosen only when the user allows it (`--hgca`); its
quality is measured by `offbatch eval-ppl --hgca`. Prefill attention stays exact.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch

from offbatch.attention.backend import AttentionStep, StepTerms, register_attention
from offbatch.attention.dense import grouped_attention, grouped_lse, merge_by_lse
from offbatch.attention.hgca_setting import HGCASetting
from offbatch.attention.host_attention import topk_attention
from offbatch.attention.host_kv_gpu import HostKVGPU
from offbatch.attention.wave import _index, packed_attention
from offbatch.offload.kv import WaveKV


@functools.lru_cache(maxsize=64)
def setting_of(text: str) -> HGCASetting:
    return HGCASetting.parse(text) if text else HGCASetting()


@dataclass
class HGCAStep:
    """What one step's HGCA needs, the same for every layer."""

    slots: torch.Tensor  # decoding slots on the compute device
    store_slots: torch.Tensor  # host store: slots / positions of the new tokens (host tensors)
    store_pos: torch.Tensor
    window_pos: torch.Tensor  # the new tokens' places in the GPU part (compute device)
    window_len: torch.Tensor  # valid GPU entries per decoding sequence, the new token's included
    older: list[int]  # rows (decoding sequences) with keys in host memory only
    lo: torch.Tensor  # per slot of the wave: older keys [lo, hi) (empty for slots without an older row)
    hi: torch.Tensor
    older_rows_dev: torch.Tensor | None  # `older` on the compute device
    prefill_rows: torch.Tensor | None  # prompt rows (of the step's prompt part) kept in the GPU part
    prefill_slots: torch.Tensor | None
    prefill_pos: torch.Tensor | None


@register_attention
class HGCA(HostKVGPU):
    name = "hgca"
    words = "hybrid GPU-CPU attention (HGCA)"
    attention_words = "recent window on the GPU, older keys top-k on the CPU threads"
    attends_on_host = True
    needs_gpu = False  # runs anywhere (on a CPU both halves run on the host); offered only when asked for
    lossy = True
    rank = 3

    # ---- planner terms -----------------------------------------------------------------------------
    @staticmethod
    def window_positions(setting: HGCASetting, max_len: int) -> int:
        return min(max_len, setting.sinks + setting.window)

    @classmethod
    def device_bytes(cls, shape, knobs, max_len: int) -> dict[str, int]:
        s = setting_of(knobs.hgca)
        fmt = cls.kv_format_of(shape, knobs)
        rows = 3 * knobs.wave * shape.spec.q_size * shape.dsize + 24 * knobs.wave
        # The GPU part of every slot, and one layer's gather of a micro-batch of them for the product.
        part = knobs.wave * fmt.slot_bytes(shape.spec, cls.window_positions(s, max_len))
        gather = 2 * fmt.tensor_bytes(shape.spec, knobs.wave, cls.window_positions(s, max_len))
        return {"kv": part + gather, "activations": rows}

    @classmethod
    def host_bytes(cls, shape, knobs, max_len: int, pinned: bool) -> int:
        spec = shape.spec
        # float32 scores of the older keys of one slot group, and the gathered values: bounded chunks.
        scratch = 4 * min(knobs.wave, 64) * spec.num_heads * max_len * 4
        return super().host_bytes(shape, knobs, max_len, pinned) + scratch

    @classmethod
    def step_terms(cls, m, decode, T, covered, ctx_mean, zero) -> StepTerms:
        s = setting_of(m.knobs.hgca)
        hw, L, spec, dsize = m.hw, m.L, m.shape.spec, m.shape.dsize
        d2h, store_s = cls.kv_store_s(m, T)
        on_gpu = np.minimum(ctx_mean, s.sinks + s.window)
        older = np.maximum(0.0, ctx_mean - s.sinks - s.window)
        gpu_bytes = decode * on_gpu * (m.kv_row * L)
        # The CPU reads every older key (half a row: K) for the scores, and the values of the top-k keys of
        # each query head (at most every older value).
        picked = np.minimum(older, s.top_k * (spec.num_heads // spec.num_kv_heads))
        cpu_bytes = decode * (older + picked) * (m.kv_row_values / 2 * L)  # by values, as host-kv-cpu
        rate = hw.host.cpu_attn_contended_bytes_s if m.streams else hw.host.cpu_attn_bytes_s
        serial = [(decode > 0) * (L * 2 * hw.host.sync_s),
                  decode * ((spec.q_size * 2) * dsize * L) / hw.h2d_pageable_bytes_s]
        return StepTerms(kv_link_bytes=zero, kv_store_bytes=d2h, gpu_s=gpu_bytes / hw.mem_bytes_s,
                         cpu_s=cpu_bytes / rate, kv_copy_s=zero, kv_store_s=store_s, serial=serial)

    @classmethod
    def summary_words(cls, gpu: str) -> str:
        return "KV in host memory, recent window on the GPU, older keys top-k on the CPU (HGCA)"

    # ---- runtime -----------------------------------------------------------------------------------
    def __init__(self, spec, plan, device, dtype: torch.dtype):
        if spec.sliding_window:
            raise ValueError(f"HGCA is for full attention; this model attends a sliding window of "
                             f"{spec.sliding_window} keys")
        super().__init__(spec, plan, device, dtype)
        self.setting = setting_of(plan.hgca)
        self.window_len = self.window_positions(self.setting, plan.max_len)
        # The GPU part, in the plan's KV format like the host store (each key is quantized once).
        self.near = WaveKV(spec, plan.wave_size, self.window_len, self.device, dtype, fmt=self.kv.format)
        self.attention_device = self.device
        self.cpu_s = 0.0  # host seconds in the CPU half (telemetry)

    def _place(self, p: int) -> int:
        s, w = self.setting.sinks, self.setting.window
        return p if p < s else s + (p - s) % w

    def _valid(self, length: int) -> int:
        s, w = self.setting.sinks, self.setting.window
        return min(length, s) + min(w, max(0, length - s))

    def begin_step(self, dec_slots, dec_lengths, prefill, prefill_groups) -> AttentionStep:
        dev, host = self.device, torch.device("cpu")
        lo = [0] * self.kv.slots
        hi = [0] * self.kv.slots
        older = []
        for j, (slot, n) in enumerate(zip(dec_slots, dec_lengths)):
            sink_end, recent_start = self.setting.split(n + 1)
            if recent_start > sink_end and self.setting.top_k > 0:  # top_k 0: the window alone
                older.append(j)
                lo[slot], hi[slot] = sink_end, recent_start
        rows, pslots, ppos, row = [], [], [], 0
        for slot, n in prefill:
            for p in range(n):
                if p < self.setting.sinks or p >= n - self.setting.window:
                    rows.append(row + p)
                    pslots.append(slot)
                    ppos.append(self._place(p))
            row += n
        own = HGCAStep(
            slots=_index(dec_slots, dev), store_slots=_index(dec_slots, host), store_pos=_index(dec_lengths, host),
            window_pos=_index([self._place(n) for n in dec_lengths], dev),
            window_len=_index([self._valid(n + 1) for n in dec_lengths], dev), older=older,
            lo=torch.tensor(lo, dtype=torch.long), hi=torch.tensor(hi, dtype=torch.long),
            older_rows_dev=_index(older, dev) if older else None,
            prefill_rows=_index(rows, dev) if rows else None, prefill_slots=_index(pslots, dev) if rows else None,
            prefill_pos=_index(ppos, dev) if rows else None)
        return AttentionStep(None, list(prefill), [list(g) for g in prefill_groups], own=own, rows=len(dec_slots))

    def prefill(self, layer, q, k, v, step):
        h = step.own
        if h.prefill_rows is not None:
            self.near.write_tokens(layer, h.prefill_slots, h.prefill_pos, k[h.prefill_rows], v[h.prefill_rows])
        return super().prefill(layer, q, k, v, step)

    def decode(self, layer, q, k, v, step, lse: bool = False):
        h = step.own
        # The new token: into host KV (asynchronously from a GPU) and into the GPU part.
        self.kv.settle(layer)
        if self.kv.writer is not None:
            self.kv.writer.store_tokens(layer, k, v, h.store_slots, h.store_pos)
        else:
            self.kv.write_tokens(layer, h.store_slots, h.store_pos, k, v)
        self.near.write_tokens(layer, h.slots, h.window_pos, k, v)
        # q of the rows with older keys leaves first: the GPU half is queued behind that copy and runs
        # while the host threads work.
        q_host = None
        if h.older:
            q_host = q[h.older_rows_dev].to("cpu", non_blocking=True) if q.is_cuda else q[h.older]
            if q.is_cuda:
                copied = torch.cuda.Event()
                copied.record()
        near_out, near_lse = self._near(layer, q, h)
        if not h.older:
            return near_out, (near_lse if lse else None)
        if q.is_cuda:
            copied.synchronize()
        t0 = time.perf_counter()
        far_out, far_lse = self._far(layer, q_host, h)
        self.cpu_s += time.perf_counter() - t0
        if q.is_cuda:
            self.host_blocked_s += time.perf_counter() - t0
        full_out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        full_lse = torch.full(q.shape[:2], float("-inf"), device=q.device, dtype=torch.float32)
        full_out[h.older_rows_dev] = far_out.to(q.device, non_blocking=True)
        full_lse[h.older_rows_dev] = far_lse.to(q.device, non_blocking=True)
        merged, merged_lse = merge_by_lse([near_out.float(), full_out], [near_lse, full_lse])
        return merged.to(q.dtype), (merged_lse if lse else None)

    def _near(self, layer, q, h: HGCAStep):
        """Exact attention over each decoding sequence's GPU part (sinks and recent keys)."""
        kk = self.near.k[layer][h.slots]
        vv = self.near.v[layer][h.slots]
        self.near.read_bytes += 2 * kk.numel() * kk.element_size()
        if self.near.packed:
            return packed_attention(q, kk, vv, h.window_len, self.near.bits, self.near.group)
        qr, q_pos = q[:, :, None, :], (h.window_len - 1)[:, None]
        out = grouped_attention(qr, kk, vv, q_pos, h.window_len)[:, :, 0, :]
        return out, grouped_lse(qr, kk, q_pos, h.window_len)[:, :, 0]

    def _far(self, layer, q_host: torch.Tensor, h: HGCAStep):
        """Top-k attention over the older keys, in host memory, on the host threads: rows of `older`."""
        slots = h.store_slots[h.older]
        lo, hi = h.lo[slots], h.hi[slots]
        length = int(hi.max())
        kk = self.kv.k[layer][:, :, :length]
        vv = self.kv.v[layer][:, :, :length]
        # Rows of q placed at their slots: the store is read in place, never gathered.
        q_all = torch.zeros((self.kv.slots,) + tuple(q_host.shape[1:]), dtype=q_host.dtype)
        q_all[slots] = q_host
        bits = self.kv.bits if self.kv.packed else 16
        group = self.kv.group if self.kv.packed else 0
        out, s = topk_attention(q_all, kk, vv, h.lo, h.hi, self.setting.top_k, bits, group)
        self.kv.read_bytes += int((hi - lo).sum()) * self.kv.row_bytes * 2
        return out[slots], s[slots]
