"""Wave attention (slot-range decode, fresh-prompt prefill) equals per-sequence causal attention."""

import pytest
import torch

from offbatch.attention.wave import decode_attention, prefill_attention
from offbatch.models.layers import causal_attention
from offbatch.models.spec import ModelSpec
from offbatch.offload.kv import WaveKV


def spec(nh=4, nkv=2, d=8):
    return ModelSpec(family="llama", vocab_size=10, hidden_size=nh * d, num_layers=2, num_heads=nh,
                     num_kv_heads=nkv, head_dim=d, intermediate_size=8, max_position=64)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("micro_batch", [1, 3, 8])
def test_prefill_then_decode_matches_per_sequence_attention(window, micro_batch):
    torch.manual_seed(micro_batch)
    sp = spec()
    kv = WaveKV(sp, slots=6, max_len=16, device="cpu", dtype=torch.float32)
    prompt_lens = {4: 5, 1: 2, 5: 7}  # slot -> prompt length; slots 0, 2, 3 stay dead
    layer = 1
    seqs = list(prompt_lens.items())
    T = sum(prompt_lens.values())
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    out = prefill_attention(kv, layer, q, k, v, seqs, [[0, 1], [2]], window)
    keys = {}
    row = 0
    for slot, n in seqs:
        expected = causal_attention(q[row : row + n], k[row : row + n], v[row : row + n], 0, window)
        torch.testing.assert_close(out[row : row + n], expected)
        keys[slot] = (k[row : row + n], v[row : row + n])
        row += n
    # Three decode steps; the slot order differs from the prefill order on purpose.
    order = [5, 4, 1]
    for step in range(3):
        qd, kd, vd = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
        lengths = [prompt_lens[s] + step for s in order]
        got = decode_attention(kv, layer, qd, kd, vd, order, lengths, micro_batch, torch.device("cpu"), window)
        for j, s in enumerate(order):
            kk = torch.cat([keys[s][0], kd[j : j + 1]])
            vv = torch.cat([keys[s][1], vd[j : j + 1]])
            keys[s] = (kk, vv)
            expected = causal_attention(qd[j : j + 1], kk, vv, lengths[j], window)[0]
            torch.testing.assert_close(got[j], expected)
    assert torch.isfinite(kv.k[layer]).all()


def test_decode_attention_counts_the_kv_it_reads():
    # Slots 0..5, micro-batches of 4: [0..3] holds live slots 1 (length 5) and 3 (length 2), [4..5] slot 4
    # (length 7). Each micro-batch reads K and V up to its longest live context (+1 for the new token).
    sp = spec()
    kv = WaveKV(sp, slots=6, max_len=16, device="cpu", dtype=torch.float32)
    slots, lengths = [1, 3, 4], [5, 2, 7]
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    decode_attention(kv, 0, q, k, v, slots, lengths, 4, torch.device("cpu"))
    row = 2 * 8 * 4  # kv heads x head dim x float32
    assert kv.read_bytes == 2 * (4 * 6 + 2 * 8) * row
    assert kv.copied_bytes == 0  # the KV is where the attention runs
