"""Pure model functions over flattened tokens: norms, rope, attention projections, FFN, MoE.

Weights come in as a module's `ModuleWeights` (offbatch/formats): tensors by canonical local name
("q.weight", "experts.3.up.weight", ...) for norms, and `w.linear(x, "q")` for every linear layer, so
the same code runs whatever format stores the weights and wherever they live (the reference forward
wraps its plain dicts with `DENSE.weights`). Numerics follow transformers (norms and router softmax in
float32, rope tables in float32 cast to the activation dtype) so greedy tokens match.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from offbatch.formats import ModuleWeights
from offbatch.models.spec import ModelSpec

Weights = ModuleWeights  # or any Mapping of tensors with a format's `linear(x, name)`


# ---- norms ---------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def norm(x: torch.Tensor, w: Weights, name: str, spec: ModelSpec) -> torch.Tensor:
    if spec.norm == "layer":
        return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w.get(f"{name}.bias"), spec.norm_eps)
    return rms_norm(x, w[f"{name}.weight"], spec.norm_eps)


# ---- rope ----------------------------------------------------------------
def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = spec.rope_scaling
    if not sc:
        return inv
    if sc["rope_type"] == "linear":
        return inv / float(sc["factor"])
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos/sin: [T, d]. Half-split (non-interleaved) rotation, as in HF checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---- attention projections ----------------------------------------------
def attention_qkv(x: torch.Tensor, w: Weights, spec: ModelSpec, cos=None, sin=None):
    """Normalised hidden states [T, H] -> q [T, nh, d], k and v [T, nkv, d], rope applied."""
    T = x.shape[0]
    q = w.linear(x, "q")
    k = w.linear(x, "k")
    v = w.linear(x, "v")
    if spec.qk_norm == "full":  # OLMoE: over all heads at once
        q = rms_norm(q, w["q_norm.weight"], spec.norm_eps)
        k = rms_norm(k, w["k_norm.weight"], spec.norm_eps)
    q = q.view(T, spec.num_heads, spec.head_dim)
    k = k.view(T, spec.num_kv_heads, spec.head_dim)
    v = v.view(T, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm == "head":  # Qwen3: per head, before rope
        q = rms_norm(q, w["q_norm.weight"], spec.norm_eps)
        k = rms_norm(k, w["k_norm.weight"], spec.norm_eps)
    if cos is not None:
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
    return q, k, v


def attention_output(attn: torch.Tensor, w: Weights) -> torch.Tensor:
    """attn: [T, nh, d] -> [T, H]."""
    return w.linear(attn.reshape(attn.shape[0], -1), "o")


def causal_attention(q, k, v, q_start: int, window: int | None = None) -> torch.Tensor:
    """One sequence. q: [t, nh, d] at positions q_start.., k/v: [L, nkv, d] at 0..L-1 -> [t, nh, d]."""
    t, nh, _ = q.shape
    L, nkv, _ = k.shape
    qpos = torch.arange(q_start, q_start + t, device=q.device)[:, None]
    kpos = torch.arange(L, device=q.device)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    rep = nh // nkv
    kk = k.transpose(0, 1).repeat_interleave(rep, dim=0)
    vv = v.transpose(0, 1).repeat_interleave(rep, dim=0)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
    return out.transpose(0, 1)


# ---- FFN -----------------------------------------------------------------
def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def mlp(x: torch.Tensor, w: Weights, spec: ModelSpec, prefix: str = "") -> torch.Tensor:
    up = w.linear(x, f"{prefix}up")
    if spec.gated_ffn:
        h = activation(spec.activation, w.linear(x, f"{prefix}gate")) * up
    else:
        h = activation(spec.activation, up)
    return w.linear(h, f"{prefix}down")


def route(x: torch.Tensor, w: Weights, spec: ModelSpec):
    """Router: softmax over all experts in float32, top-k, optional renormalisation.
    Returns (weights [T, k] in x.dtype, expert ids [T, k])."""
    moe = spec.moe
    logits = w.linear(x, "router")
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_w, top_i = probs.topk(moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(x.dtype), top_i


def group_by_expert(top_i: torch.Tensor, num_experts: int):
    """Flattened (token, slot) pairs sorted by expert: (order, counts). order indexes top_i.view(-1)."""
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def shared_expert(x: torch.Tensor, w: Weights, spec: ModelSpec) -> torch.Tensor | None:
    if not spec.moe.shared_expert_intermediate_size:
        return None
    s = mlp(x, w, spec, "shared.")
    if spec.moe.shared_expert_gate:
        s = torch.sigmoid(w.linear(x, "shared_gate")) * s
    return s
