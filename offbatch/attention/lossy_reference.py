"""The decode view of the lossy attention options, for the reference forward: what `eval-ppl --kv/--hgca`
measures.

A teacher-forced forward scores every position of a window at once, so it cannot decode token by token;
instead its attention shows each query what a decode step of the engine would show it:
  - a lossy KV format: every key and value is quantized ONCE, as the store writes it (here: before it
    enters the reference's KV cache, which then holds the decoded values), and every query attends over
    those stored keys and values, its own included;
  - HGCA (attention/hgca_setting.py): each query attends exactly to the sink keys and its recent window,
    and per query head to the top_k older keys by score q.k (computed from the stored keys), one softmax
    over the union. Causal as usual.
(The engine's prompt prefill itself stays exact; this is the view of every decoded token.)

`LossyCacheAttention` has CacheAttention's interface (engine/reference.py), so ReferenceModel takes it
as its attention. Dense KV without HGCA runs CacheAttention's very arithmetic: identical logits.
"""

from __future__ import annotations

import torch

from offbatch.attention.hgca_setting import HGCASetting
from offbatch.kernels import kv_reference
from offbatch.models import layers as L
from offbatch.models.spec import ModelSpec
from offbatch.offload.kv import KVFormat, PackedKV, kv_format, kv_format_name

SCORE_BYTES = 256 << 20  # float32 scores of one HGCA chunk of queries, at most
CHUNK_ROWS = 256  # queries per HGCA chunk: small blocks stay in cache, and a chunk scores only keys it sees


def stored_view(fmt: KVFormat, x: torch.Tensor) -> torch.Tensor:
    """K or V [..., head_dim] as a store in `fmt` gives it back: x itself for an exact format, else
    decode(encode(x)) in x's dtype. Packed formats encode with the torch twin (kv_reference), the contract
    the engine's kernel keeps, so the oracle never depends on the kernel it checks."""
    if not fmt.lossy:
        return x
    d = x.shape[-1]
    if isinstance(fmt, PackedKV):
        packed = kv_reference.kv_encode(x, fmt.bits, fmt.group_of(d))
    else:
        packed = fmt.encode(x)
    return fmt.decode(packed, d, x.dtype)


def hgca_mask_(scores: torch.Tensor, q_pos: torch.Tensor, setting: HGCASetting) -> torch.Tensor:
    """Set to -inf, in place, the scores of the keys HGCA does not attend. scores [..., t, L] (leading dims:
    one per query head) of queries at positions q_pos [t] over keys at 0..L-1. Kept: causal, the sinks,
    the recent window, and per query head the top_k older keys by score. Returns scores."""
    length = scores.shape[-1]
    kpos = torch.arange(length, device=scores.device)[None, :]
    qpos = q_pos[:, None]
    exact = (kpos <= qpos) & ((kpos < setting.sinks) | (kpos > qpos - setting.window))  # [t, L]
    # Older keys are [sinks, pos + 1 - window) for a query at pos: only columns below the last query's
    # bound can be older, so the top-k looks at that slice alone.
    first, end = setting.sinks, min(length, int(q_pos.max()) + 1 - setting.window)
    if setting.top_k > 0 and end > first:
        older = kpos[:, first:end] < qpos + 1 - setting.window  # [t, end - first]
        if setting.top_k >= end - first:  # every older key is in the top_k
            exact[:, first:end] |= older
        else:
            part = scores[..., first:end]
            candidates = part.masked_fill(~older, float("-inf"))
            top = candidates.topk(setting.top_k, dim=-1)
            # Only the top_k survive (a query with fewer older keys gets -inf ones from topk: they stay -inf).
            sparse = torch.full_like(candidates, float("-inf")).scatter_(-1, top.indices, top.values)
            part.copy_(torch.where(exact[:, first:end], part, sparse))
            exact[:, first:end] = True  # this slice is final
    return scores.masked_fill_(~exact, float("-inf"))


def hgca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, setting: HGCASetting,
                   score_bytes: int = SCORE_BYTES, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """One sequence under HGCA. q [t, nh, d] at positions q_start.., k/v [L, nkv, d] at 0..L-1 ->
    [t, nh, d] in q's dtype. Explicit float32 scores (scaled by d**-0.5); query heads h*rep..h*rep+rep-1
    share KV head h (GQA). Queries go in chunks of at most `chunk` rows whose scores stay within
    score_bytes; a chunk scores only the keys its queries can see (causal)."""
    t, nh, d = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    qf = q.float().transpose(0, 1).reshape(nkv, rep, t, d)
    kf, vf = k.float().transpose(0, 1), v.float().transpose(0, 1)  # [nkv, L, d]
    rows = max(1, min(chunk, score_bytes // (4 * nh * (q_start + t))))
    outs = []
    for a in range(0, t, rows):
        b = min(t, a + rows)
        seen = q_start + b  # keys 0..seen-1: the chunk's last query sees them all
        scores = torch.einsum("hrtd,hld->hrtl", qf[:, :, a:b], kf[:, :seen]) * (d ** -0.5)
        hgca_mask_(scores, torch.arange(q_start + a, q_start + b, device=q.device), setting)
        p = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("hrtl,hld->hrtd", p, vf[:, :seen]))
    out = torch.cat(outs, dim=2).reshape(nh, t, d)
    return out.transpose(0, 1).to(q.dtype)


class LossyCacheAttention:
    """CacheAttention (engine/reference.py) with a KV format and optionally HGCA: the decode view of the
    engine's lossy attention options. kv: a KV format name (offload/kv.py; unknown: a KeyError); hgca: an
    HGCASetting or None (full attention). HGCA on a sliding-window model: a ValueError."""

    def __init__(self, spec: ModelSpec, kv: str = "dense", hgca: HGCASetting | None = None,
                 score_bytes: int = SCORE_BYTES, key_scales=None):
        """key_scales: balanced keys (attention/key_balance.py), applied as the engine applies them."""
        self.spec = spec
        self.key_scales = key_scales
        self.kv = kv_format_name(kv)
        self.hgca = hgca
        self.score_bytes = score_bytes
        if hgca is not None:
            hgca.check_model(spec.sliding_window)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step) -> torch.Tensor:
        caches, lens = step
        fmt = kv_format(self.kv, k.dtype)
        if self.key_scales is not None:
            q, k = self.key_scales.apply(layer, q, k)
        k, v = stored_view(fmt, k), stored_view(fmt, v)  # quantized once, as written; the cache holds them
        outs, start = [], 0
        for cache, n in zip(caches, lens):
            kk, vv = cache.extend(layer, k[start : start + n], v[start : start + n])
            qq = q[start : start + n]
            if self.hgca is None:
                outs.append(L.causal_attention(qq, kk, vv, cache.length, self.spec.sliding_window))
            else:
                outs.append(hgca_attention(qq, kk, vv, cache.length, self.hgca, self.score_bytes))
            start += n
        return torch.cat(outs)
