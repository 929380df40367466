"""Dense attention over a padded batch of sequences, grouped-query aware, without copying K/V per head.

Query heads that share a KV head are folded into the query-length axis, so each KV head is read once
for its whole group (decode with GQA is a [rep, d] x [d, L] product per KV head, not rep of them).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN's fused attention, torch's first choice for a boolean mask on an H100/H200, builds an execution
# plan for every new shape, and decode meets a new context length at every step: the first run through
# a job's lengths paid for it on most calls (a decode step at 150 ms against 26 ms once the plans were
# built, BENCHMARKS.md). The memory-efficient kernel takes the same masks with no per-shape plan.
# OFFBATCH_SDPA_CUDNN=1 allows cuDNN again (to measure the difference).
SDPA_BACKENDS = ([SDPBackend.CUDNN_ATTENTION] if os.environ.get("OFFBATCH_SDPA_CUDNN") == "1" else []) + [
    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention restricted to SDPA_BACKENDS."""
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      k_len: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """q: [b, nh, t, d]; k, v: [b, nkv, L, d]; q_pos: [b, t] absolute positions of the queries;
    k_len: [b] valid keys per sequence (keys at positions 0..k_len-1). Causal: a query sees keys at
    positions <= its own. Returns [b, nh, t, d]."""
    b, nh, t, d = q.shape
    nkv, L = k.shape[1], k.shape[2]
    rep = nh // nkv
    qg = q.reshape(b, nkv, rep * t, d)
    kpos = torch.arange(L, device=q.device)
    qp = q_pos.repeat(1, rep)  # [b, rep*t], the same order as qg's rows
    mask = (kpos[None, None, :] <= qp[:, :, None]) & (kpos[None, None, :] < k_len[:, None, None])
    if window:
        mask &= kpos[None, None, :] > qp[:, :, None] - window
    out = sdpa(qg, k, v, mask[:, None])
    return out.reshape(b, nh, t, d)


def grouped_lse(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_len: torch.Tensor,
                window: int | None = None) -> torch.Tensor:
    """The log-sum-exp of grouped_attention's scaled, masked scores, in float32: [b, nh, t]. Two
    attentions over disjoint key sets merge exactly by it (merge_by_lse). Computed apart from the
    product, which keeps SDPA's numerics."""
    b, nh, t, d = q.shape
    nkv, L = k.shape[1], k.shape[2]
    rep = nh // nkv
    qg = q.reshape(b, nkv, rep * t, d).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * (d ** -0.5)  # [b, nkv, rep*t, L]
    kpos = torch.arange(L, device=q.device)
    qp = q_pos.repeat(1, rep)
    mask = (kpos[None, None, :] <= qp[:, :, None]) & (kpos[None, None, :] < k_len[:, None, None])
    if window:
        mask &= kpos[None, None, :] > qp[:, :, None] - window
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.logsumexp(scores, dim=-1).reshape(b, nh, t)


def merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of disjoint key sets from each set's output [..., nh, d] and
    log-sum-exp [..., nh]: each output weighted by its share of the total softmax mass. Returns the
    merged output (in the outputs' dtype) and log-sum-exp."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(o.float() * torch.exp(s - lse)[..., None] for o, s in zip(outs, lses))
    return out.to(outs[0].dtype), lse
