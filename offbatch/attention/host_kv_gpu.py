"""host-kv-gpu: the wave's KV in pinned host memory; each decode micro-batch's slot range is copied to
the device (its live positions, one range ahead on a stream of its own: offload/kv_fetch.py, sharing the
link with the weight copies) and attended there. A decode step's new K/V rows are written into the pinned
host KV by the GPU (attention/wave.py, kernels.scatter_tokens); prompts' K/V go back through the host
writer's staging ring (offload/kv_writer.py), off the compute stream's path."""

from __future__ import annotations

import numpy as np

from offbatch.attention.backend import AttentionBackend, StepTerms, register_attention
from offbatch.offload.copy2d import live_copies_enabled
from offbatch.offload.kv import pinned_allocation_bytes
from offbatch.offload.kv_fetch import copy_stream_enabled
from offbatch.offload.kv_writer import staging_bytes, staging_rows


@register_attention
class HostKVGPU(AttentionBackend):
    name = "host-kv-gpu"
    words = "host KV with GPU attention"
    kv_words = "pinned host memory"
    attention_words = "on the GPU, KV copied over per micro-batch"
    kv_on_host = True
    needs_gpu = True
    rank = 1

    @classmethod
    def device_bytes(cls, shape, knobs, max_len: int) -> dict[str, int]:
        # A query and an output row per slot stay on the device, and the K and V buffers a micro-batch's
        # slot range is copied into (offload/kv_fetch.py: two pairs, one being filled while the other is
        # read, reused by every range of the step).
        mb = min(knobs.attn_micro_batch, knobs.wave)
        rows = 3 * knobs.wave * shape.spec.q_size * shape.dsize + 24 * knobs.wave
        pairs = 2 if copy_stream_enabled() else 1
        return {"kv": 2 * pairs * cls.kv_format_of(shape, knobs).tensor_bytes(shape.spec, mb, max_len),
                "activations": rows}

    @classmethod
    def host_bytes(cls, shape, knobs, max_len: int, pinned: bool) -> int:
        # Pinned host KV is packed into power-of-two chunks like the weights (offload/kv.py), plus the
        # host KV writer's staging ring (one pinned allocation).
        fmt, spec = cls.kv_format_of(shape, knobs), shape.spec
        ring = staging_bytes(fmt, spec, staging_rows(knobs.prefill_tokens, max_len, knobs.wave))
        return fmt.store_bytes(spec, knobs.wave, max_len, pinned) + (pinned_allocation_bytes(ring) if pinned else ring)

    @classmethod
    def kv_store_s(cls, m, T):
        """New K/V cross the link's other direction (device-to-host): prompts' through a pinned staging
        ring and a writer thread's scatter, decode rows written by the GPU in place (a few MB a layer);
        either way beside the chain, not in it, at the slower of the link and the host's memory."""
        d2h = T * (m.kv_row * m.L)
        return d2h, d2h / min(m.hw.d2h_bytes_s, m.hw.host.cpu_attn_contended_bytes_s)

    @classmethod
    def step_terms(cls, m, decode, T, covered, ctx_mean, zero) -> StepTerms:
        # Each covered slot's live positions, every layer: up to the longest live context of its
        # micro-batch (sequences admitted together share one: about the mean), and the new token's.
        # (OFFBATCH_KV_COPY_LIVE=0: whole max_len ranges.)
        live = np.minimum(ctx_mean + 1, m.max_len) if live_copies_enabled() else m.max_len
        kv_h2d = covered * (live * m.kv_row * m.L)
        d2h, store_s = cls.kv_store_s(m, T)
        attn_bytes = covered * ctx_mean * (m.kv_row * m.L)
        # The copies run on a stream of their own, one range ahead of the attention: they share the link
        # with the weight copies (in the step's link bytes) and are not in the compute chain. Issued on the
        # compute stream (OFFBATCH_KV_COPY_STREAM=0) they are in both.
        kv_copy = zero if copy_stream_enabled() else kv_h2d / m.hw.h2d_pinned_bytes_s
        # Each micro-batch of each layer: a copy to issue on the fetch stream, its events, the new tokens to
        # patch in, all on the host thread. (Copies on the compute stream: in attn_call_s, fitted to that
        # engine.)
        ranges = np.ceil(covered / max(1, min(m.knobs.attn_micro_batch, m.knobs.wave)))
        issue = m.L * ranges * m.hw.host.kv_fetch_range_s if copy_stream_enabled() else zero
        return StepTerms(kv_link_bytes=kv_h2d, kv_store_bytes=d2h, gpu_s=attn_bytes / m.hw.mem_bytes_s, cpu_s=zero,
                         kv_copy_s=kv_copy, kv_store_s=store_s, issue_s=issue)

    @classmethod
    def summary_words(cls, gpu: str) -> str:
        return "KV in host memory, decode attention on the GPU"
