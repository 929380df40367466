"""Decode attention on the host threads over KV in host memory, dense or packed (int8 / int4 rows).

Two users: the `host-kv-cpu` backend (exact attention over each slot's keys: `host_decode_attention`,
the contract of kernels/kv_reference.kv_decode_attention) and HGCA's CPU half (sparse attention over
each slot's older keys: per query head only the `top_k` best-scoring keys, `topk_attention`; its
log-sum-exp merges with the GPU's dense part, attention/dense.merge_by_lse).

How it is fast with plain torch ops on a few cores:
- Slots are taken in groups of consecutive slots whose key ranges overlap well (a group's tensors are
  views of the store, no copy; a group reads at most ~25% positions past its slots' own ranges), and
  a group's positions in blocks of about BLOCK_VALUES values, so a block's float32 K or V stays in
  cache between its conversion and the product that reads it.
- Two passes per group instead of an online softmax: all scores of the group first (float32 scores
  are rep/d of the K they come from), one exact softmax, then the values. No rescaling, no -inf cases.
- GQA: the rep query heads of a KV head are one [rep, d] x [d, P] product per block.
- Packed rows are never dequantized value by value. A code c of group g stands for c * s + m (s, m:
  the row's scale and minimum of that group), so
      q . k = sum_g s_g (q_g . c_g) + m_g sum(q_g)      sum_n p_n v_n,g = sum_n (p_n s_n,g) c_n,g + sum_n p_n m_n,g
  A block's codes are converted to float32 once, group-major ([B, groups, n, group]: the conversion
  writes that order directly), and the products run per group ([rep, group] x [group, n] for K,
  [rep, n] x [n, group] for V); scales and minimums then touch only rep * groups values per position.
  These cores are compute-bound on float32 products (a [rep, d] x [d, n] product runs at ~2 G values/s
  per core, a conversion pass at ~5), so saving the dequantization passes is what counts.
  int4 codes are read as (byte & 0x0F) and (byte & 0xF0) = 16 * high nibble, into a column order of
  lows then highs per group; the query is permuted (and its high half scaled by 1/16, exactly) instead.
- top-k: the scores of all keys, torch.topk per query head, then only the selected V rows are
  gathered (one index_select of rows over the store) and summed as above; where the selection covers
  much of a range (rep * top_k * GATHERED_ROW_COST >= its length) one dense pass with zero weights off
  the selection is cheaper than gathering.
"""

from __future__ import annotations

import torch

from offbatch.kernels import kv_reference

# Float32 values of K (or V) one block converts and multiplies: 2 MiB, so a block is still in cache when
# the product reads it. Measured (scripts/bench_host_attention.py, 2 cores, 1 MiB L2 each, 8 MiB L3):
# 2^19 and 2^20 within noise, 2^18 ~15% and 2^17 ~40% slower (more, smaller operations).
BLOCK_VALUES = 1 << 19
# A group of slots may compute at most this share of positions past its slots' own ranges.
GROUP_SLACK = 0.25
# topk_attention: a V row gathered by index costs about this many rows read in order (random reads of
# 100-300 bytes; scripts/bench_host_attention.py); past that one dense pass with zero weights reads less.
GATHERED_ROW_COST = 1.5


# ---- the KV layout of one call ----------------------------------------------------------------------
class _Layout:
    """What a call's K/V rows are (dense in a float dtype: bits 16; packed codes: bits 8 / 4) and how a
    block of them converts to float32: [B, groups, n, group], group-major (see the module docstring)."""

    def __init__(self, d: int, bits: int, group: int, row: int):
        self.d, self.bits = d, bits
        if bits == 16:
            if row != d:
                raise ValueError(f"dense KV rows of {row} values, expected head_dim {d}")
            self.group, self.groups = d, 1
            return
        if row != kv_reference.row_bytes(d, bits, group):
            raise ValueError(f"packed KV rows of {row} bytes, expected {kv_reference.row_bytes(d, bits, group)} "
                             f"(head_dim {d}, {bits} bits, groups of {group})")
        self.group, self.groups = group, d // group
        self.code_bytes = d * bits // 8
        if bits == 4:
            half = group // 2  # column (g, t, j) holds value g*group + 2j + t; t = 1 holds 16x the code
            g, t, j = torch.meshgrid(torch.arange(self.groups), torch.arange(2), torch.arange(half), indexing="ij")
            self.perm = (g * group + 2 * j + t).reshape(d)
            self.factor = torch.where(t == 1, 1.0 / 16, 1.0).reshape(d)

    @property
    def packed(self) -> bool:
        return self.bits != 16

    def block_f32(self, raw: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        """Rows [B, n, row] -> float32 [B * groups, n, group]: dense values (the rows themselves when
        already float32), or packed codes group-major in the layout's column order."""
        B, n = raw.shape[:2]
        if not self.packed:
            return raw if raw.dtype == torch.float32 else buffer[: raw.numel()].view(raw.shape).copy_(raw)
        G, group = self.groups, self.group
        out = buffer[: B * n * self.d].view(B, G, n, group)
        codes = raw[..., : self.code_bytes]
        if self.bits == 8:
            out.copy_(codes.view(B, n, G, group).transpose(1, 2))
        else:
            halves = out.view(B, G, n, 2, group // 2)
            halves[..., 0, :].copy_((codes & 0x0F).view(B, n, G, group // 2).transpose(1, 2))
            halves[..., 1, :].copy_((codes & 0xF0).view(B, n, G, group // 2).transpose(1, 2))
        return out.view(B * G, n, group)

    def param_words(self, rows: torch.Tensor) -> torch.Tensor:
        """Packed rows [B, n, row_bytes] -> a view of their parameters [B, n, words] in the widest words that
        divide them, their rows and their offset (int64, int32, bytes): a strided copy's cost is per word."""
        for dtype, size in ((torch.int64, 8), (torch.int32, 4)):
            if (4 * self.groups) % size == 0 and self.code_bytes % size == 0:
                try:
                    return rows.view(dtype)[..., self.code_bytes // size :]
                except RuntimeError:  # rows or offset not whole words
                    continue
        return rows[..., self.code_bytes :]

    def pairs(self, words: torch.Tensor) -> torch.Tensor:
        """Parameter words [B, n, words] -> (scale, minimum) pairs float32 [B, n, groups, 2]."""
        B, n = words.shape[:2]
        return words.contiguous().view(torch.float16).float().view(B, n, self.groups, 2)

    def query_columns(self, q: torch.Tensor) -> torch.Tensor:
        """q [..., d] (natural order) -> the weights of the converted codes' columns."""
        return q[..., self.perm] * self.factor if self.bits == 4 else q

    def value_columns(self, x: torch.Tensor) -> torch.Tensor:
        """Sums over converted codes [..., d] (layout order) -> natural order, high nibbles scaled back."""
        if self.bits != 4:
            return x
        out = torch.empty_like(x)
        out[..., self.perm] = x * self.factor
        return out


# ---- groups of slots and blocks of positions ------------------------------------------------------------
def _slot_groups(lo: list[int], hi: list[int], values_per_position: int) -> list[tuple[int, int, int, int]]:
    """(first slot, end slot, first position, end position) of each group of consecutive slots with keys.
    Slots share a group only while the whole group is one block (short ranges: few large products beat
    many small ones) and its span times its slots stays within GROUP_SLACK of the slots' own positions.
    Slots without keys are in no group."""
    groups = []
    block_positions = max(16, BLOCK_VALUES // values_per_position)
    S, i = len(lo), 0
    while i < S:
        if hi[i] <= lo[i]:
            i += 1
            continue
        a, g_lo, g_hi, own = i, lo[i], hi[i], hi[i] - lo[i]
        j = i + 1
        while j < S and hi[j] > lo[j]:
            n_lo, n_hi, n_own = min(g_lo, lo[j]), max(g_hi, hi[j]), own + hi[j] - lo[j]
            slots, computed = j - a + 1, (j - a + 1) * (n_hi - n_lo)
            if computed > block_positions or computed > (1 + GROUP_SLACK) * n_own + 16 * slots:
                break
            g_lo, g_hi, own, j = n_lo, n_hi, n_own, j + 1
        groups.append((a, j, g_lo, g_hi))
        i = j
    return groups


class _Group:
    """One group's K/V views [B = slots * nkv, span, row], its queries, and its two passes."""

    def __init__(self, layout: _Layout, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, a: int, b: int, p0: int, p1: int):
        nkv, d = k.shape[1], layout.d
        self.layout, self.a, self.b, self.p0, self.p1 = layout, a, b, p0, p1
        self.B, self.rep, self.span = (b - a) * nkv, q.shape[1] // nkv, p1 - p0
        self.k = k[a:b, :, p0:p1].reshape(self.B, self.span, k.shape[-1])  # views: slot and head dims merge
        self.v = v[a:b, :, p0:p1].reshape(self.B, self.span, v.shape[-1])
        self.q = q[a:b].float().reshape(self.B, self.rep, d) * (d ** -0.5)
        self.valid = None  # [B, 1, span]: which positions are the slot's keys; None: all of the span
        if bool((lo[a:b] != p0).any() or (hi[a:b] != p1).any()):
            pos = torch.arange(p0, p1)
            valid = (pos >= lo[a:b, None]) & (pos < hi[a:b, None])  # [slots, span]
            self.valid = valid[:, None, None, :].expand(b - a, nkv, 1, self.span).reshape(self.B, 1, self.span)
        self.blocks = _blocks(self.span, self.B * d)
        converts = layout.packed or k.dtype != torch.float32
        self.buffer = torch.empty(self.B * (self.blocks[0][1] - self.blocks[0][0]) * d) if converts else None

    def scores(self) -> torch.Tensor:
        """Scaled scores [B, rep, span] float32, -inf outside each slot's range."""
        L, B, rep = self.layout, self.B, self.rep
        if not L.packed:
            out = torch.empty(B, rep, self.span)
            for s, e in self.blocks:
                out[..., s:e] = torch.bmm(self.q, L.block_f32(self.k[:, s:e], self.buffer).transpose(1, 2))
        else:  # per group g the query's columns of g times the codes, then sum_g s_g (...) + m_g sum(q_g)
            G = L.groups
            q_groups = L.query_columns(self.q).view(B, rep, G, L.group).transpose(1, 2).reshape(B * G, rep, L.group)
            partial = torch.empty(B, G, rep, self.span)
            k_words = L.param_words(self.k)
            words = torch.empty(k_words.shape, dtype=k_words.dtype)
            for s, e in self.blocks:
                codes = L.block_f32(self.k[:, s:e], self.buffer)
                partial[..., s:e] = torch.bmm(q_groups, codes.transpose(1, 2)).view(B, G, rep, e - s)
                words[:, s:e] = k_words[:, s:e]  # from cache now; alone, a few bytes would cost a line a row
            pairs = L.pairs(words)  # [B, span, G, 2]; the elementwise work runs once over the span
            out = partial.mul_(pairs[..., 0].transpose(1, 2).unsqueeze(2)).sum(1)
            q_sums = self.q.view(B, rep, G, L.group).sum(-1)  # [B, rep, G]
            out.baddbmm_(q_sums, pairs[..., 1].transpose(1, 2).contiguous())
        return out if self.valid is None else out.masked_fill_(~self.valid, float("-inf"))

    def weighted_values(self, p: torch.Tensor) -> torch.Tensor:
        """sum over the span of p [B, rep, span] times the V rows -> [B, rep, d] float32."""
        return _weighted_rows(self.layout, p, self.v, self.blocks, self.buffer)


def _blocks(n: int, values_per_position: int) -> list[tuple[int, int]]:
    """Positions 0..n in blocks of about BLOCK_VALUES values."""
    step = max(16, BLOCK_VALUES // values_per_position)
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _weighted_rows(layout: _Layout, p: torch.Tensor, rows: torch.Tensor, blocks: list[tuple[int, int]],
                   buffer: torch.Tensor | None) -> torch.Tensor:
    """sum_n p[b, r, n] * V[b, n] -> [B, rep, d] float32, for p [B, rep, n] and V rows [B, n, row] (dense,
    or packed: the scales weight the codes and the minimums the weights' sums, see the module docstring)."""
    B, rep, n = p.shape
    L, d = layout, layout.d
    if not L.packed:
        acc = torch.zeros(B, rep, d)
        for s, e in blocks:
            acc.baddbmm_(p[..., s:e], L.block_f32(rows[:, s:e], buffer))
        return acc
    G = L.groups
    acc = torch.zeros(B * G, rep, L.group)
    sums = torch.zeros(B, rep, G, 2)  # sum_n p_n (s_n,g, m_n,g)
    words = L.param_words(rows)
    for s, e in blocks:
        codes = L.block_f32(rows[:, s:e], buffer)
        pairs = L.pairs(words[:, s:e])  # [B, n, G, 2], read after the codes: from cache
        weights = torch.empty(B, G, rep, e - s)  # p_n s_n,g: row (b, g) weighs group g's codes
        torch.mul(p[..., s:e].unsqueeze(1), pairs[..., 0].transpose(1, 2).unsqueeze(2), out=weights)
        acc.baddbmm_(weights.view(B * G, rep, e - s), codes)
        sums.view(B, rep, 2 * G).baddbmm_(p[..., s:e], pairs.view(B, e - s, 2 * G))
    codes_part = L.value_columns(acc.view(B, G, rep, L.group).transpose(1, 2).reshape(B, rep, d))
    return (codes_part.view(B, rep, G, L.group) + sums[..., 1:]).view(B, rep, d)


def _prepare(q, k, v, lo, hi, bits, group):
    S, nh, d = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != S or nh % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    layout = _Layout(d, bits, group, k.shape[-1])
    L = k.shape[2]
    lo = lo.to(torch.int64).clamp(0, L)
    hi = hi.to(torch.int64).clamp(0, L)
    groups = _slot_groups(lo.tolist(), hi.tolist(), k.shape[1] * d)
    return layout, lo, hi, groups


def _softmax_parts(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [..., n] (every row with a finite one) -> exp(scores - max) (in place), its row sums and
    the rows' log-sum-exp: one exp pass; the products divide by the sums afterwards (rep*d, not n, values)."""
    top = scores.amax(dim=-1, keepdim=True)
    p = scores.sub_(top).exp_()
    total = p.sum(dim=-1, keepdim=True)
    return p, total, top + total.log()


# ---- the public functions -------------------------------------------------------------------------------
def host_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: torch.Tensor,
                          bits: int = 16, group: int = 0, window_start: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_reference.kv_decode_attention's contract on the host threads: q [S, nh, d]; k, v [S, nkv, L, row]
    (views of a host store; dense rows in a float dtype, or packed rows of `bits` with groups of `group`);
    keys window_start[s] <= p < k_len[s] of slot s count. Returns (out [S, nh, d] in q's dtype, lse [S, nh]
    float32). A slot without keys gets out 0 and lse -inf."""
    S, nh, d = q.shape
    lo = torch.zeros(S, dtype=torch.int64) if window_start is None else window_start
    layout, lo, hi, groups = _prepare(q, k, v, lo, k_len, bits, group)
    out = torch.zeros(S, nh, d)
    lse = torch.full((S, nh), float("-inf"))
    for a, b, p0, p1 in groups:
        g = _Group(layout, q, k, v, lo, hi, a, b, p0, p1)
        scores = g.scores()
        p, total, g_lse = _softmax_parts(scores)
        out[a:b] = g.weighted_values(p).div_(total).view(b - a, nh, d)
        lse[a:b] = g_lse.view(b - a, nh)
    return out.to(q.dtype), lse


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   top_k: int, bits: int = 16, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of each query head over the keys lo[s] <= p < hi[s] of its slot: the top_k best
    scaled scores (all when fewer), softmax over those, their V rows summed. q [S, nh, d]; k, v
    [S, nkv, L, row] as in host_decode_attention. Returns (out [S, nh, d], lse [S, nh]), float32; an
    empty range gives out 0 and lse -inf (merge_by_lse then ignores it)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    S, nh, d = q.shape
    layout, lo, hi, groups = _prepare(q, k, v, lo, hi, bits, group)
    out = torch.zeros(S, nh, d)
    lse = torch.full((S, nh), float("-inf"))
    rows = _store_rows(v)
    for a, b, p0, p1 in groups:
        g = _Group(layout, q, k, v, lo, hi, a, b, p0, p1)
        scores = g.scores()
        kk = min(top_k, g.span)
        if kk == g.span:  # every key of every range: exact attention
            p, total, g_lse = _softmax_parts(scores)
            out[a:b] = g.weighted_values(p).div_(total).view(b - a, nh, d)
            lse[a:b] = g_lse.view(b - a, nh)
            continue
        top, idx = torch.topk(scores, kk, dim=-1, sorted=False)  # [B, rep, kk]; -inf: fewer keys than kk
        g_lse = torch.logsumexp(top, dim=-1, keepdim=True)
        p = top.sub_(g_lse).exp_()  # 0 where -inf
        if g.rep * kk * GATHERED_ROW_COST >= g.span or rows is None:  # most keys kept: one dense pass
            dense_p = torch.zeros_like(scores).scatter_(-1, idx, p)
            o = g.weighted_values(dense_p)
        else:
            o = _gathered_values(g, rows, v, layout, idx, p, a, p0)
        out[a:b] = o.view(b - a, nh, d)
        lse[a:b] = g_lse.view(b - a, nh)
    return out, lse


def _store_rows(v: torch.Tensor) -> torch.Tensor | None:
    """v [S, nkv, L, row] as a 2-D view [rows, row] of its storage, row (s, h, p) at s*S0 + h*S1 + p (the
    strides in rows), or None where the strides do not allow one (the caller then reads densely)."""
    S, nkv, L, row = v.shape
    st = v.stride()
    if st[3] != 1 or st[2] < row or st[0] % st[2] or st[1] % st[2]:
        return None
    n = (S - 1) * (st[0] // st[2]) + (nkv - 1) * (st[1] // st[2]) + L
    return v.as_strided((n, row), (st[2], 1))


def _gathered_values(g: _Group, rows: torch.Tensor, v: torch.Tensor, layout: _Layout, idx: torch.Tensor,
                     p: torch.Tensor, a: int, p0: int) -> torch.Tensor:
    """sum_j p_j V[idx_j] of the selected rows only: [B, rep, d] float32."""
    st, nkv = v.stride(), v.shape[1]
    slot = torch.arange(g.B) // nkv + a
    head = torch.arange(g.B) % nkv
    base = slot * (st[0] // st[2]) + head * (st[1] // st[2]) + p0  # row of (slot, head, p0)
    flat = (base.view(g.B, 1, 1) + idx).reshape(-1)
    kept = idx.shape[-1]
    picked = rows.index_select(0, flat).view(g.B * g.rep, kept, rows.shape[-1])  # each query head's own rows
    blocks = _blocks(kept, g.B * g.rep * layout.d)
    converts = layout.packed or picked.dtype != torch.float32
    buffer = torch.empty(g.B * g.rep * (blocks[0][1] - blocks[0][0]) * layout.d) if converts else None
    return _weighted_rows(layout, p.reshape(g.B * g.rep, 1, kept), picked, blocks, buffer).view(g.B, g.rep, layout.d)


def topk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lo: torch.Tensor,
                             hi: torch.Tensor, top_k: int, bits: int = 16, group: int = 0,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_attention's twin: slot by slot, whole rows dequantized, plain torch."""
    S, nh, d = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    out = torch.zeros(S, nh, d)
    lse = torch.full((S, nh), float("-inf"))
    for s in range(S):
        a, b = int(lo[s]), min(int(hi[s]), k.shape[2])
        if b <= a:
            continue
        ks, vs = k[s, :, a:b], v[s, :, a:b]
        if bits != 16:
            ks = kv_reference.kv_decode(ks, d, bits, group, torch.float32)
            vs = kv_reference.kv_decode(vs, d, bits, group, torch.float32)
        ks, vs = ks.float(), vs.float()  # [nkv, n, d]
        scores = torch.einsum("hrd,hnd->hrn", q[s].float().view(nkv, rep, d), ks) * d ** -0.5
        top, idx = torch.topk(scores, min(top_k, b - a), dim=-1)
        weights = torch.softmax(top, dim=-1)
        chosen = torch.stack([vs[h][idx[h]] for h in range(nkv)])  # [nkv, rep, kk, d]
        out[s] = torch.einsum("hrk,hrkd->hrd", weights, chosen).reshape(nh, d)
        lse[s] = torch.logsumexp(top, dim=-1).reshape(nh)
    return out, lse
