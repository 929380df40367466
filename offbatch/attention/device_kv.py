"""device-kv: the wave's KV on the compute device; decode attention reads it in place."""

from __future__ import annotations

from offbatch.attention.backend import AttentionBackend, StepTerms, register_attention


@register_attention
class DeviceKV(AttentionBackend):
    name = "device-kv"
    words = "KV on the GPU"
    kv_words = "GPU"
    attention_words = "on the GPU"
    rank = 0

    @classmethod
    def device_bytes(cls, shape, knobs, max_len: int) -> dict[str, int]:
        return {"kv": knobs.wave * cls.kv_format_of(shape, knobs).slot_bytes(shape.spec, max_len), "activations": 0}

    @classmethod
    def step_terms(cls, m, decode, T, covered, ctx_mean, zero) -> StepTerms:
        # Decode reads each covered slot's KV up to the longest live context of its micro-batch
        # (sequences admitted together share a micro-batch: about the mean), at device-memory rate.
        attn_bytes = covered * ctx_mean * (m.kv_row * m.L)
        return StepTerms(kv_link_bytes=zero, kv_store_bytes=zero, gpu_s=attn_bytes / m.hw.mem_bytes_s, cpu_s=zero,
                         kv_copy_s=zero, kv_store_s=zero)

    @classmethod
    def summary_words(cls, gpu: str) -> str:
        return f"KV on the {gpu}"
