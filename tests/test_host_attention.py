"""Host decode attention (offbatch/attention/host_attention.py) against its twins: host_decode_attention
against kernels/kv_reference.kv_decode_attention, topk_attention against topk_attention_reference (and
against full attention where top_k keeps every key), and HGCA's split (sinks + older top-k + recent
window, merged by log-sum-exp) against attention over everything.

K and V are views of a larger store (a slot range, the first L positions of longer rows), with random
values past each slot's keys; dense rows in float32 / bfloat16, or packed rows from kv_reference.kv_encode.
Each case runs with the default block size and with a tiny one, so slots also span many blocks.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from offbatch.attention import host_attention as ha
from offbatch.attention.dense import merge_by_lse
from offbatch.kernels import kv_reference

F32, BF16 = torch.float32, torch.bfloat16

# (slots, kv heads, rep, head_dim, longest, bits, group, dtype)
CASES = [
    (1, 1, 1, 64, 1, 16, 0, F32),
    (3, 2, 3, 64, 130, 16, 0, F32),
    (5, 2, 4, 128, 300, 16, 0, BF16),
    (4, 1, 4, 64, 77, 16, 0, BF16),
    (2, 4, 1, 128, 257, 8, 64, F32),
    (5, 1, 3, 64, 300, 8, 32, F32),
    (4, 2, 4, 128, 190, 8, 64, BF16),
    (3, 2, 1, 64, 211, 4, 32, F32),
    (5, 1, 4, 128, 280, 4, 32, F32),
    (2, 2, 3, 64, 64, 4, 16, BF16),
    # parameters read as int32 words (one group), as bytes (rows not whole int32s)
    (3, 2, 2, 64, 90, 8, 64, F32),
    (3, 1, 2, 6, 40, 8, 6, F32),
    (2, 2, 1, 12, 33, 4, 4, F32),
]
IDS = [f"S{c[0]}-kv{c[1]}-rep{c[2]}-d{c[3]}-L{c[4]}-b{c[5]}-{str(c[7])[6:]}" for c in CASES]


@pytest.fixture(params=["blocks", "tiny-blocks"])
def block_size(request, monkeypatch):
    """The default block size, and one of a few positions (many blocks per slot, groups of one slot)."""
    if request.param == "tiny-blocks":
        monkeypatch.setattr(ha, "BLOCK_VALUES", 1 << 11)
    return request.param


def generator(*key) -> torch.Generator:
    """A generator seeded from the case (the same inputs every run, different ones per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_kv(S, nkv, d, L, bits, group, dtype, g):
    """K and V [S, nkv, L, row]: views of a store with a slot before and after and rows 7 positions longer."""
    shape = (S + 2, nkv, L + 7, d)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if bits == 16:
        k, v = k.to(dtype), v.to(dtype)
    else:
        k, v = kv_reference.kv_encode(k, bits, group), kv_reference.kv_encode(v, bits, group)
    return k[1 : S + 1, :, :L], v[1 : S + 1, :, :L]


def ranges(S, L, g, allow_empty):
    """Per-slot key ranges [lo, hi) within [0, L): the last slot uses all L keys (L bounds the view), one
    slot (when there are several) has a single key, and with allow_empty one has none."""
    hi = torch.randint(1, L + 1, (S,), generator=g)
    lo = (torch.rand(S, generator=g) * hi).long()
    hi[-1], lo[-1] = L, 0 if S == 1 else int(lo[-1])
    if S > 1:
        lo[0], hi[0] = hi[0] - 1, hi[0]
    if allow_empty and S > 2:
        lo[1] = hi[1]
    return lo, hi


def tolerances(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == F32 else dict(atol=1.6e-2, rtol=1.6e-2)  # bf16: 1-2 ulps


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_attention_matches_twin(case, block_size):
    S, nkv, rep, d, L, bits, group, dtype = case
    g = generator((case, block_size))
    k, v = make_kv(S, nkv, d, L, bits, group, dtype, g)
    q = torch.randn(S, nkv * rep, d, generator=g).to(dtype)
    lo, hi = ranges(S, L, g, allow_empty=False)
    for window_start in (None, lo):
        out, lse = ha.host_decode_attention(q, k, v, hi, bits, group, window_start)
        ref_out, ref_lse = kv_reference.kv_decode_attention(q, k, v, hi, bits, group, window_start)
        assert out.dtype == dtype and out.shape == (S, nkv * rep, d)
        assert lse.dtype == F32 and lse.shape == (S, nkv * rep)
        torch.testing.assert_close(out.float(), ref_out.float(), **tolerances(dtype))
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_decode_attention_slot_without_keys():
    """window_start == k_len: no keys, out 0 and lse -inf (the twin divides 0 by 0 there)."""
    g = torch.Generator().manual_seed(7)
    k, v = make_kv(3, 2, 64, 20, 8, 32, F32, g)
    q = torch.randn(3, 4, 64, generator=g)
    k_len, start = torch.tensor([20, 9, 5]), torch.tensor([0, 9, 2])
    out, lse = ha.host_decode_attention(q, k, v, k_len, 8, 32, start)
    ref_out, ref_lse = kv_reference.kv_decode_attention(q, k, v, k_len, 8, 32, start)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    torch.testing.assert_close(out[[0, 2]], ref_out[[0, 2]], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[[0, 2]], ref_lse[[0, 2]], atol=2e-5, rtol=2e-5)


def full_attention_over(q, k, v, lo, hi, bits, group):
    """kv_decode_attention over [lo, hi) where non-empty; out 0, lse -inf where empty."""
    out, lse = kv_reference.kv_decode_attention(q.float(), k, v, hi.clamp(min=1), bits, group, lo)
    empty = hi <= lo
    return out.masked_fill(empty[:, None, None], 0.0), lse.masked_fill(empty[:, None], float("-inf"))


def assert_empty_slots(out, lse, lo, hi):
    empty = hi <= lo
    assert torch.all(out[empty] == 0) and torch.all(lse[empty] == float("-inf"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_topk_keeping_every_key_is_full_attention(case, block_size):
    S, nkv, rep, d, L, bits, group, dtype = case
    g = generator((case, block_size, "all"))
    k, v = make_kv(S, nkv, d, L, bits, group, dtype, g)
    q = torch.randn(S, nkv * rep, d, generator=g).to(dtype)
    lo, hi = ranges(S, L, g, allow_empty=True)
    ref_out, ref_lse = full_attention_over(q, k, v, lo, hi, bits, group)
    for top_k in (int((hi - lo).max()), L + 5):
        out, lse = ha.topk_attention(q, k, v, lo, hi, top_k, bits, group)
        assert out.dtype == F32 and lse.dtype == F32
        assert_empty_slots(out, lse, lo, hi)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_topk_matches_reference(case, block_size):
    """Fewer keys kept than the ranges hold: the same selection (random values: no ties), through the
    gathered rows (few kept) and through the dense pass with zero weights (most kept)."""
    S, nkv, rep, d, L, bits, group, dtype = case
    g = generator((case, block_size, "some"))
    k, v = make_kv(S, nkv, d, L, bits, group, dtype, g)
    q = torch.randn(S, nkv * rep, d, generator=g) * 2  # sharper scores: the kept keys matter
    lo, hi = ranges(S, L, g, allow_empty=True)
    for top_k in sorted({1, 5, max(1, L // 7), max(1, L // 2)}):
        out, lse = ha.topk_attention(q, k, v, lo, hi, top_k, bits, group)
        ref_out, ref_lse = ha.topk_attention_reference(q, k, v, lo, hi, top_k, bits, group)
        assert_empty_slots(out, lse, lo, hi)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_topk_reference_by_hand():
    """top_k 1 is the best key's V row with lse its score; top_k 2 the softmax of the two best."""
    g = torch.Generator().manual_seed(3)
    S, nkv, rep, d, L = 2, 2, 2, 64, 40
    k, v = make_kv(S, nkv, d, L, 16, 0, F32, g)
    q = torch.randn(S, nkv * rep, d, generator=g)
    lo, hi = torch.tensor([3, 0]), torch.tensor([31, 40])
    one_out, one_lse = ha.topk_attention_reference(q, k, v, lo, hi, 1)
    two_out, two_lse = ha.topk_attention_reference(q, k, v, lo, hi, 2)
    for s in range(S):
        for h in range(nkv * rep):
            keys, values = k[s, h // rep, lo[s] : hi[s]], v[s, h // rep, lo[s] : hi[s]]
            scores = keys @ q[s, h] / d**0.5
            best = scores.topk(2)
            torch.testing.assert_close(one_out[s, h], values[best.indices[0]])
            torch.testing.assert_close(one_lse[s, h], best.values[0])
            w = torch.softmax(best.values, 0)
            torch.testing.assert_close(two_out[s, h], w[0] * values[best.indices[0]] + w[1] * values[best.indices[1]])
            torch.testing.assert_close(two_lse[s, h], torch.logsumexp(best.values, 0))


@pytest.mark.parametrize("case", CASES[1::2], ids=IDS[1::2])
def test_hgca_split_merges_to_full_attention(case):
    """Sinks [0, lo) and the recent window [hi, k_len) exactly, the older keys [lo, hi) by topk_attention
    keeping all of them: merge_by_lse of the three is attention over [0, k_len). Empty parts included
    (no sinks, no older keys, no recent window)."""
    S, nkv, rep, d, L, bits, group, dtype = case
    g = generator((case, "hgca"))
    k, v = make_kv(S, nkv, d, L, bits, group, dtype, g)
    q = torch.randn(S, nkv * rep, d, generator=g).to(dtype)
    k_len = torch.randint(1, L + 1, (S,), generator=g)
    k_len[-1] = L
    sinks = torch.randint(0, 5, (S,), generator=g).minimum(k_len)
    window = torch.randint(0, L // 2 + 2, (S,), generator=g)
    hi = (k_len - window).maximum(sinks)
    sinks[0], hi[0] = 0, k_len[0]  # all of slot 0 is "older"
    if S > 1:
        hi[1] = sinks[1]  # slot 1 has no older keys
    parts = [ha.host_decode_attention(q.float(), k, v, sinks, bits, group),
             ha.topk_attention(q, k, v, sinks, hi, L, bits, group),
             ha.host_decode_attention(q.float(), k, v, k_len, bits, group, window_start=hi)]
    out, lse = merge_by_lse([o for o, _ in parts], [s for _, s in parts])
    ref_out, ref_lse = kv_reference.kv_decode_attention(q.float(), k, v, k_len, bits, group)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_rows_of_the_wrong_size_are_refused():
    g = torch.Generator().manual_seed(0)
    k, v = make_kv(2, 1, 64, 8, 8, 32, F32, g)
    q = torch.randn(2, 2, 64, generator=g)
    with pytest.raises(ValueError, match="packed KV rows"):
        ha.host_decode_attention(q, k, v, torch.tensor([8, 8]), 4, 32)
    with pytest.raises(ValueError, match="top_k"):
        ha.topk_attention(q, k, v, torch.tensor([0, 0]), torch.tensor([8, 8]), 0, 8, 32)
