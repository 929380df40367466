"""host-kv-cpu: the wave's KV in pinned host memory, decode attention on the host threads: only q and
the output cross the link, the host reads the KV at its DRAM rate (shared with the weight copies)."""

from __future__ import annotations

from offbatch.attention.backend import StepTerms, register_attention
from offbatch.attention.host_kv_gpu import HostKVGPU


@register_attention
class HostKVCPU(HostKVGPU):
    name = "host-kv-cpu"
    words = "host KV with CPU attention"
    attention_words = "on the CPU threads"
    attends_on_host = True
    rank = 2

    @classmethod
    def device_bytes(cls, shape, knobs, max_len: int) -> dict[str, int]:
        return dict(super().device_bytes(shape, knobs, max_len), kv=0)  # no K/V on the device

    @classmethod
    def host_bytes(cls, shape, knobs, max_len: int, pinned: bool) -> int:
        mb = min(knobs.attn_micro_batch, knobs.wave)  # float32 scores of one host micro-batch, and its output
        return super().host_bytes(shape, knobs, max_len, pinned) + 3 * mb * shape.spec.num_heads * max_len * 4

    @classmethod
    def step_terms(cls, m, decode, T, covered, ctx_mean, zero) -> StepTerms:
        hw, L, spec, dsize = m.hw, m.L, m.shape.spec, m.shape.dsize
        d2h, store_s = cls.kv_store_s(m, T)
        attn_bytes = covered * ctx_mean * (m.kv_row_values * L)  # priced by values (cost.StepModel.kv_row_values)
        rate = hw.host.cpu_attn_contended_bytes_s if m.streams else hw.host.cpu_attn_bytes_s
        # q over and the output back every layer (waits), the new K/V stored at once.
        serial = [(decode > 0) * (L * 2 * hw.host.sync_s),
                  decode * ((spec.q_size * 2 + m.kv_row // dsize) * dsize * L) / hw.h2d_pageable_bytes_s]
        return StepTerms(kv_link_bytes=zero, kv_store_bytes=d2h, gpu_s=zero, cpu_s=attn_bytes / rate, kv_copy_s=zero,
                         kv_store_s=store_s, serial=serial)

    @classmethod
    def summary_words(cls, gpu: str) -> str:
        return "KV in host memory, decode attention on the CPU"
