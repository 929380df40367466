"""Memory a plan holds, per tier: the device (weight slots, resident weights, KV, activations) and the
host (pinned weights, host KV, runtime). The engine's peak must stay under the cap, so every figure
here is an upper bound of what the engine allocates for that use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from offbatch.attention import get_attention
from offbatch.formats import get_format
from offbatch.formats.base import dtype_bytes
from offbatch.models.spec import ModelSpec
from offbatch.offload.kv import kv_format
from offbatch.offload.weights import pinned_bytes
from offbatch.plan import SAMPLE_CHUNK_ENTRIES, SCORE_BYTES
from offbatch.planner.shape import ModelShape

SAFETY = 0.90  # of the GPU cap: allocator fragmentation and what we do not model
HOST_RUNTIME = 2 << 30  # the Python process and torch on the host side
# With CUDA the process also holds the CUDA context, cuBLAS/cuDNN and Triton's compiler on the host side: peak
# RSS on the H200 ran up to 2.75 GiB beyond the plan's weights, KV and staging (BENCHMARKS.md, twelfth session).
HOST_RUNTIME_CUDA = 3 << 30


@dataclass(frozen=True)
class Knobs:
    """The batch-size and backend choices of a plan (residency is derived from what is left)."""

    wave: int  # KV slots: sequences decoded together
    prefill_tokens: int  # prompt tokens admitted per step
    ffn_micro_tokens: int  # tokens per FFN / expert call
    attn_micro_batch: int  # sequences per decode attention call
    attention: str = "device-kv"  # the attention backend (offbatch.attention): where KV lives, where decode attends
    kv_format: str = "dense"  # how K/V are stored (offload.kv)
    hgca: str = ""  # the HGCA setting (attention/hgca_setting.py), with the attention backend "hgca"


SAMPLER_ENTRY_BYTES = 32  # the sampler's copies of an entry of the rows it samples at once


def activation_bytes(spec: ModelSpec, tokens: int, ffn_tokens: int, attn_batch: int, max_len: int,
                     dtype: torch.dtype) -> int:
    """Peak transient device memory of one step: hidden states and projections of all its tokens, one
    FFN micro-batch's intermediates, one attention micro-batch's K/V, mask and scores."""
    H, dsize = spec.hidden_size, dtype_bytes(dtype)
    inter = max(spec.intermediate_size, spec.moe.expert_intermediate_size if spec.moe else 0,
                spec.moe.shared_expert_intermediate_size if spec.moe else 0)
    hidden = tokens * (4 * H + spec.q_size + 2 * spec.kv_size + spec.q_size) * dsize
    if spec.moe:
        hidden += tokens * spec.moe.top_k * (H * dsize + 16)  # routed copies, weights, indices
    ffn = ffn_tokens * (3 * inter + H) * dsize
    kv = 2 * kv_format("dense", dtype).tensor_bytes(spec, attn_batch, max_len)  # K/V as attention reads them
    # Scores (float32) and the mask of one attention call; prefill calls are cut to SCORE_BYTES.
    scores = min(SCORE_BYTES, attn_batch * spec.num_heads * max_len * max_len * 4)
    mask = scores // 4 // max(1, spec.num_kv_heads)
    return hidden + ffn + kv + 2 * scores + mask


def step_tokens(knobs: Knobs, max_prompt_len: int) -> int:
    """Most tokens one step can carry: a prefill budget (at least one whole prompt) plus the wave."""
    return max(knobs.prefill_tokens, max_prompt_len) + knobs.wave


def device_transient_bytes(shape: ModelShape, knobs: Knobs, max_prompt_len: int, max_len: int) -> dict[str, int]:
    """Device bytes that do not depend on residency: KV and activations."""
    mb = min(knobs.attn_micro_batch, knobs.wave)
    act = activation_bytes(shape.spec, step_tokens(knobs, max_prompt_len), knobs.ffn_micro_tokens, mb, max_len,
                           shape.dtype)
    # After the layers: the head's logits of every sequence of the step, in the compute dtype and as the
    # float32 copy the engine samples from, beside the step's hidden states (the sampler's own copies are
    # bounded: engine/sampler.py SAMPLE_CHUNK_ENTRIES).
    spec, dsize = shape.spec, shape.dsize
    logits = knobs.wave * spec.vocab_size * (dsize + 4) + 2 * step_tokens(knobs, max_prompt_len) * spec.hidden_size * dsize
    sampler = SAMPLER_ENTRY_BYTES * min(max(SAMPLE_CHUNK_ENTRIES, spec.vocab_size), knobs.wave * spec.vocab_size)
    own = get_attention(knobs.attention).device_bytes(shape, knobs, max_len)  # the backend's KV and rows
    return {"kv": own["kv"], "activations": max(act, logits + sampler) + own["activations"]
            + expansion_scratch_bytes(shape)}


def expansion_scratch_bytes(shape: ModelShape) -> int:
    """A format that expands its weights before a GEMM holds one dense weight at a time: the largest."""
    if not get_format(shape.weights).expands:
        return 0
    spec, H = shape.spec, shape.spec.hidden_size
    inter = max(spec.intermediate_size, spec.moe.expert_intermediate_size if spec.moe else 0,
                spec.moe.shared_expert_intermediate_size if spec.moe else 0)
    return max(inter, spec.q_size, spec.kv_size) * H * shape.dsize


def kv_slot_bytes(shape: ModelShape, knobs: Knobs, max_len: int) -> int:
    """One sequence's KV in the plan's KV format."""
    return kv_format(knobs.kv_format, shape.dtype).slot_bytes(shape.spec, max_len)


def _pinned(n: int) -> int:
    """torch's pinned-memory allocator rounds every block up to a power of two."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def host_weight_bytes(shape: ModelShape, pinned: bool, exclude=frozenset()) -> int:
    """Host bytes of the weights (less `exclude`, the disk tier), packed as the WeightStore packs them."""
    keys = [k for k in sorted(shape.nbytes) if k not in exclude]
    if not pinned:
        return sum(shape.nbytes[k] for k in keys)
    # The embedding stays pageable (looked up on the host); the rest is packed into pinned chunks.
    embed = sum(shape.nbytes[k] for k in keys if k[1] == "embed")
    return embed + pinned_bytes([shape.nbytes[k] for k in keys if k[1] != "embed"])


def host_bytes(shape: ModelShape, knobs: Knobs, max_len: int, pinned: bool, weights: int | None = None) -> dict[str, int]:
    """Host memory of a run: every weight packed (pinned when the device is CUDA), host KV, runtime."""
    weights = host_weight_bytes(shape, pinned) if weights is None else weights
    kv = get_attention(knobs.attention).host_bytes(shape, knobs, max_len, pinned)
    return {"weights": weights, "kv": kv, "runtime": HOST_RUNTIME_CUDA if pinned else HOST_RUNTIME}


# ---- the disk tier --------------------------------------------------------------------------------------
STAGING_BUFFERS = 2  # pinned buffers a disk module is read into: one being read while one is copied


@dataclass(frozen=True)
class HostTier:
    """How the weights split between pinned host memory and the checkpoint on disk."""

    host: dict[str, int]  # host bytes by use: weights (pinned tier), staging, kv, runtime
    disk_resident_bytes: int  # device-resident modules left on disk (read once, at start)
    disk_streamed_bytes: int  # streamed modules left on disk (read at every use)
    streamed_bytes: int  # all streamed weight bytes (dense + every streamed expert)

    @property
    def disk_fraction(self) -> float:
        """Share of each step's streamed weight bytes that come from disk (disk modules are spread
        evenly over the step's use order, so the share holds for any step)."""
        return self.disk_streamed_bytes / self.streamed_bytes if self.streamed_bytes else 0.0


def staging_bytes(largest: int, pinned: bool) -> int:
    """The disk tier's staging buffers, each its own (pinned: power-of-two rounded) allocation."""
    return STAGING_BUFFERS * (_pinned(largest) if pinned else largest)


@dataclass(frozen=True)
class WeightTotals:
    """What the host side of every plan of one model starts from (computed once per solver)."""

    all_weights: int  # host bytes of every weight, packed as the WeightStore packs them
    embed: int  # the embedding table (pageable, never on disk)
    largest: int  # the largest module but the embedding (staging size, chunk-tail margin)

    @staticmethod
    def of(shape: ModelShape, pinned: bool, split: int = 1) -> "WeightTotals":
        """split: a rank of a split weight stream holds 1/split of every module but the embedding."""
        embed = sum(n for k, n in shape.nbytes.items() if k[1] == "embed")
        largest = max((n for k, n in shape.nbytes.items() if k[1] != "embed"), default=0)
        if split > 1:
            shares = [-(-n // split) for k, n in shape.nbytes.items() if k[1] != "embed"]
            return WeightTotals(embed + (pinned_bytes(shares) if pinned else sum(shares)), embed, largest)
        return WeightTotals(host_weight_bytes(shape, pinned), embed, largest)


def host_floor(shape: ModelShape, knobs: Knobs, max_len: int, pinned: bool, totals: WeightTotals) -> int:
    """The least host memory a run needs with every weight it can spare on disk: KV, runtime, the
    embedding (looked up on the host) and the staging buffers."""
    base = host_bytes(shape, knobs, max_len, pinned, weights=0)
    return sum(base.values()) + totals.embed + staging_bytes(totals.largest, pinned)


def host_tier(shape: ModelShape, knobs: Knobs, max_len: int, pinned: bool, budget: int | None,
              resident: dict[str, tuple[int, int]], streamed: dict[str, tuple[int, int]],
              totals: WeightTotals) -> HostTier | None:
    """Split the weights between pinned host memory and disk under `budget` (None: no limit): first
    the modules resident on the device (no host copy needed after start-up, so no cost per step),
    largest first, then streamed ones. resident / streamed: kind -> (module count, module bytes).
    None when even that does not fit."""
    base = host_bytes(shape, knobs, max_len, pinned, weights=0)
    all_weights = totals.all_weights
    streamed_bytes = sum(n * b for n, b in streamed.values())
    if budget is None or all_weights + sum(base.values()) <= budget:
        return HostTier(dict(base, weights=all_weights, staging=0), 0, 0, streamed_bytes)
    # Packing what is left into pinned chunks leaves tails the byte count below does not see: keep two
    # of the largest modules' worth of room for them (choose_disk then packs exactly).
    margin = 2 * totals.largest if pinned else 0
    excess = all_weights + sum(base.values()) + margin - budget
    # Moving every module but the embedding frees all pinned bytes but the embedding's: spread that
    # (the chunks' tails included) over the movable bytes.
    movable = sum(n * b for n, b in resident.values()) + streamed_bytes
    r = (all_weights - totals.embed) / movable if movable else 1.0
    moved = freed = 0
    for n, b in sorted(resident.values(), key=lambda nb: -nb[1]):
        take = min(n, math.ceil(excess / (b * r))) if excess > 0 else 0
        excess -= take * b * r
        freed += take * b * r
        moved += take * b
    if excess <= 0:
        return HostTier(dict(base, weights=all_weights - round(freed), staging=0), moved, 0, streamed_bytes)
    staging = staging_bytes(max((b for n, b in streamed.values() if n), default=0), pinned)
    excess += staging
    if excess > streamed_bytes * r:
        return None
    from_streamed = math.ceil(excess / r)
    weights = budget - sum(base.values()) - staging
    return HostTier(dict(base, weights=weights, staging=staging), moved, from_streamed, streamed_bytes)


def choose_disk(shape: ModelShape, resident: set, host_tier_: HostTier, budget: int, knobs: Knobs, max_len: int,
                pinned: bool) -> tuple[set, dict[str, int]] | None:
    """The modules of the disk tier, as the byte summary `host_tier` priced: resident modules first
    (largest first), then streamed ones spread evenly over the step's use order, until the pinned host
    tier plus KV, runtime and staging fit the budget. Returns (modules, host bytes by use)."""
    base = sum(host_bytes(shape, knobs, max_len, pinned, weights=0).values())
    keys = [k for k in shape.nbytes if k[1] != "embed"]
    streamed = [k for k in shape.order if k not in resident and k[1] != "embed"]
    largest = max((shape.nbytes[k] for k in streamed), default=0)
    weights = host_weight_bytes(shape, pinned)  # exact now; below, each module moved frees its size
    disk: set = set()
    staging = 0

    def over() -> int:
        return weights + base + staging - budget

    for k in sorted((k for k in keys if k in resident), key=lambda k: (-shape.nbytes[k], k)):
        if over() <= 0:
            break
        disk.add(k)
        weights -= shape.nbytes[k]
    if over() > 0 and streamed:
        staging = staging_bytes(largest, pinned)
        target = host_tier_.disk_fraction or (over() / max(1, sum(shape.nbytes[k] for k in streamed)))
        # Spread: take a module whenever the bytes taken so far fall behind the target share of the
        # bytes walked so far.
        walked = taken = 0
        for k in streamed:
            walked += shape.nbytes[k]
            if over() <= 0:
                break
            if taken < target * walked:
                disk.add(k)
                taken += shape.nbytes[k]
                weights -= shape.nbytes[k]
    # Exactly, as the store will pack what is left; chunk tails may ask for a few modules more.
    weights = host_weight_bytes(shape, pinned, exclude=disk)
    extra = [k for k in sorted((k for k in keys if k in resident), key=lambda k: (-shape.nbytes[k], k))
             if k not in disk] + [k for k in streamed if k not in disk]
    while over() > 0 and extra:
        k = extra.pop(0)
        if k in streamed and not staging:
            staging = staging_bytes(largest, pinned)
        disk.add(k)
        weights = host_weight_bytes(shape, pinned, exclude=disk)
    if over() > 0:
        return None
    host = host_bytes(shape, knobs, max_len, pinned, weights=weights)
    return disk, dict(host, staging=staging)
