"""Memory a plan holds, per tier: the device (weight slots, resident weights, KV, activations) and the
host (pinned weights, host KV, runtime). The engine's peak must stay under the cap, so every figure
here is an upper bound of what the engine allocates for that use."""

from __future__ import annotations

from dataclasses import dataclass

from offbatch.models.spec import ModelSpec
from offbatch.planner.shape import ModelShape

SAFETY = 0.90  # of the GPU cap: allocator fragmentation and what we do not model
SCORE_BYTES = 256 << 20  # attention scores of one prefill micro-batch (bounds its sequence count)
HOST_RUNTIME = 2 << 30  # the Python process, torch and the CUDA context on the host side
# Device slots per module kind: two let one copy run while the other module computes; experts get
# three because they are many and small, so a copy never waits for the expert before it to finish.
DEFAULT_SLOTS = {"attn": 2, "ffn": 2, "shared": 2, "expert": 3, "head": 1, "router": 2}


@dataclass(frozen=True)
class Knobs:
    """The batch-size and placement choices of a plan (residency is derived from what is left)."""

    wave: int  # KV slots: sequences decoded together
    prefill_tokens: int  # prompt tokens admitted per step
    ffn_micro_tokens: int  # tokens per FFN / expert call
    attn_micro_batch: int  # sequences per decode attention call
    kv_placement: str = "gpu"  # "gpu": on the compute device; "host": pinned host memory
    decode_attention: str = "gpu"  # with host KV: "gpu" copies micro-batches over, "cpu" attends on the host


def activation_bytes(spec: ModelSpec, tokens: int, ffn_tokens: int, attn_batch: int, max_len: int, dsize: int) -> int:
    """Peak transient device memory of one step: hidden states and projections of all its tokens, one
    FFN micro-batch's intermediates, one attention micro-batch's K/V, mask and scores."""
    H = spec.hidden_size
    inter = max(spec.intermediate_size, spec.moe.expert_intermediate_size if spec.moe else 0,
                spec.moe.shared_expert_intermediate_size if spec.moe else 0)
    hidden = tokens * (4 * H + spec.q_size + 2 * spec.kv_size + spec.q_size) * dsize
    if spec.moe:
        hidden += tokens * spec.moe.top_k * (H * dsize + 16)  # routed copies, weights, indices
    ffn = ffn_tokens * (3 * inter + H) * dsize
    kv = 2 * attn_batch * spec.kv_size * max_len * dsize
    # Scores (float32) and the mask of one attention call; prefill calls are cut to SCORE_BYTES.
    scores = min(SCORE_BYTES, attn_batch * spec.num_heads * max_len * max_len * 4)
    mask = scores // 4 // max(1, spec.num_kv_heads)
    return hidden + ffn + kv + 2 * scores + mask


def kv_slot_bytes(shape: ModelShape, max_len: int) -> int:
    return shape.kv_bytes_per_token() * max_len


def step_tokens(knobs: Knobs, max_prompt_len: int) -> int:
    """Most tokens one step can carry: a prefill budget (at least one whole prompt) plus the wave."""
    return max(knobs.prefill_tokens, max_prompt_len) + knobs.wave


def device_transient_bytes(shape: ModelShape, knobs: Knobs, max_prompt_len: int, max_len: int) -> dict[str, int]:
    """Device bytes that do not depend on residency: KV and activations."""
    spec, dsize = shape.spec, shape.dsize
    mb = min(knobs.attn_micro_batch, knobs.wave)
    act = activation_bytes(spec, step_tokens(knobs, max_prompt_len), knobs.ffn_micro_tokens, mb, max_len, dsize)
    out = {"kv": 0, "activations": act}
    if knobs.kv_placement == "gpu":
        out["kv"] = knobs.wave * kv_slot_bytes(shape, max_len)
    else:
        # Decode attention over host KV keeps a query and an output row per slot on the device; with
        # "gpu" attention a second micro-batch of copied K/V may be in flight beside the one in use.
        out["activations"] += 3 * knobs.wave * spec.q_size * dsize + 24 * knobs.wave
        if knobs.decode_attention == "gpu":
            out["kv"] = 2 * mb * spec.kv_size * max_len * dsize
    return out


def _pinned(n: int) -> int:
    """torch's pinned-memory allocator rounds every block up to a power of two."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def host_weight_bytes(shape: ModelShape, pinned: bool) -> int:
    return sum(_pinned(n) if pinned else n for n in shape.nbytes.values())


def host_bytes(shape: ModelShape, knobs: Knobs, max_len: int, pinned: bool, weights: int | None = None) -> dict[str, int]:
    """Host memory of a run: every weight packed (pinned when the device is CUDA), host KV, runtime."""
    spec = shape.spec
    size = _pinned if pinned else (lambda n: n)
    weights = host_weight_bytes(shape, pinned) if weights is None else weights
    kv = 0
    if knobs.kv_placement == "host":
        per_tensor = knobs.wave * spec.num_kv_heads * max_len * spec.head_dim * shape.dsize
        kv = 2 * spec.num_layers * size(per_tensor)
        if knobs.decode_attention == "cpu":  # float32 scores of one host micro-batch, and its output
            mb = min(knobs.attn_micro_batch, knobs.wave)
            kv += 3 * mb * spec.num_heads * max_len * 4
    return {"weights": weights, "kv": kv, "runtime": HOST_RUNTIME}
