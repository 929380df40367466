"""Plain-torch twins of the compressed-KV kernels (kv_triton.py): the contracts the Triton kernels keep.

Packed KV rows. One row is the K (or V) of one token for one KV head: `head_dim` values quantized
asymmetrically in groups of `group` consecutive values along the head dimension, stored as

    [codes: head_dim * bits / 8 bytes][params: head_dim / group pairs of float16 (scale, minimum)]

  bits 8: one uint8 code per value;
  bits 4: two codes per byte, value 2i in the low nibble, value 2i + 1 in the high nibble;
  value = code * scale + minimum, in float32, then cast to the compute dtype.

A group's scale is (max - min) / (2**bits - 1) rounded to float16 (1 where max == min), its minimum the
group's minimum rounded to float16; code = clamp(floor((x - minimum) / scale + 0.5), 0, 2**bits - 1)
computed in float32 with those rounded values, so decoding a row gives what the encoder meant.
Rows are stored as uint8 tensors [..., row_bytes(head_dim, bits, group)]: one tensor holds codes and
parameters, so a store, a copy or a slot range moves one block.
"""

from __future__ import annotations

import torch


def row_bytes(head_dim: int, bits: int, group: int) -> int:
    """Bytes of one packed row (codes, then a float16 scale and minimum per group)."""
    if bits not in (4, 8):
        raise ValueError(f"packed KV rows have 4 or 8 bits per value, not {bits}")
    if head_dim % group or (bits == 4 and group % 2):
        raise ValueError(f"head_dim {head_dim} is not a whole number of groups of {group}")
    return head_dim * bits // 8 + 4 * (head_dim // group)


def kv_encode(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x [..., head_dim] (any float dtype) -> packed rows uint8 [..., row_bytes]."""
    d = x.shape[-1]
    rb = row_bytes(d, bits, group)
    lead = x.shape[:-1]
    xg = x.reshape(-1, d // group, group).float()
    lo, hi = xg.amin(-1), xg.amax(-1)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    minimum = lo.to(torch.float16)
    codes = torch.floor((xg - minimum.float()[..., None]) / scale.float()[..., None] + 0.5).clamp_(0, qmax)
    codes = codes.to(torch.uint8).reshape(-1, d)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    params = torch.stack([scale, minimum], dim=-1).reshape(-1, 2 * (d // group)).view(torch.uint8)
    return torch.cat([codes, params], dim=-1).reshape(*lead, rb)


def kv_decode(packed: torch.Tensor, head_dim: int, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """packed rows uint8 [..., row_bytes] -> values [..., head_dim] in `dtype`."""
    rb = row_bytes(head_dim, bits, group)
    if packed.shape[-1] != rb:
        raise ValueError(f"packed KV rows of {packed.shape[-1]} bytes, expected {rb}")
    lead = packed.shape[:-1]
    p = packed.reshape(-1, rb)
    nc = head_dim * bits // 8
    codes = p[:, :nc]
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(-1, head_dim)
    params = p[:, nc:].contiguous().view(torch.float16).float().reshape(-1, head_dim // group, 2)
    x = codes.float().reshape(-1, head_dim // group, group) * params[..., 0:1] + params[..., 1:2]
    return x.reshape(*lead, head_dim).to(dtype)


def kv_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: torch.Tensor,
                        bits: int = 16, group: int = 0, window_start: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query token per slot over that slot's stored keys.

    q [S, nh, d] (compute dtype); k, v [S, nkv, L, d] in the compute dtype (bits 16) or packed rows
    [S, nkv, L, row_bytes] (bits 8 / 4, groups of `group`); k_len [S]: keys 0..k_len-1 of each slot
    count (k_len >= 1); window_start [S] or None: keys before it do not count (sliding windows).
    Query heads h*rep .. h*rep+rep-1 share KV head h (rep = nh / nkv). Scores scaled by d**-0.5.
    Returns the output [S, nh, d] in q's dtype and the log-sum-exp of each query's scaled scores
    [S, nh] in float32 (natural log)."""
    S, nh, d = q.shape
    nkv, L = k.shape[1], k.shape[2]
    if bits != 16:
        k = kv_decode(k, d, bits, group, torch.float32)
        v = kv_decode(v, d, bits, group, torch.float32)
    rep = nh // nkv
    qf = q.float().reshape(S, nkv, rep, d)
    scores = torch.einsum("shrd,shld->shrl", qf, k.float()) * (d ** -0.5)  # [S, nkv, rep, L]
    pos = torch.arange(L, device=q.device)
    valid = pos[None, :] < k_len[:, None]
    if window_start is not None:
        valid = valid & (pos[None, :] >= window_start[:, None])
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None])
    out = torch.einsum("shrl,shld->shrd", p, v.float())
    return out.reshape(S, nh, d).to(q.dtype), lse.reshape(S, nh)
