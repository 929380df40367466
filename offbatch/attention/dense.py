"""Dense attention over a padded batch of sequences, grouped-query aware, without copying K/V per head.

Query heads that share a KV head are folded into the query-length axis, so each KV head is read once
for its whole group (decode with GQA is a [rep, d] x [d, L] product per KV head, not rep of them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None])
    return out.reshape(b, nh, t, d)
