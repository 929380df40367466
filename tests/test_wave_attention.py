"""Wave attention (slot-range decode, fresh-prompt prefill) equals per-sequence causal attention."""

import pytest
import torch

from offbatch.attention.wave import decode_attention, decode_batch, prefill_attention
from offbatch.models.layers import causal_attention
from offbatch.models.spec import ModelSpec
from offbatch.offload.kv import WaveKV
from offbatch.offload.kv_writer import HostKVWriter


def spec(nh=4, nkv=2, d=8):
    return ModelSpec(family="llama", vocab_size=10, hidden_size=nh * d, num_layers=2, num_heads=nh,
                     num_kv_heads=nkv, head_dim=d, intermediate_size=8, max_position=64)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("micro_batch", [1, 3, 8])
@pytest.mark.parametrize("writer_rows", [None, 4, 64])
def test_prefill_then_decode_matches_per_sequence_attention(window, micro_batch, writer_rows):
    # writer_rows: None stores K/V at once; otherwise through a HostKVWriter with that many rows per
    # staging buffer (4: prompts split over buffers), and decode works on copied KV ranges with the new
    # token patched in, as host KV with device attention does (here on one device).
    torch.manual_seed(micro_batch)
    sp = spec()
    kv = WaveKV(sp, slots=6, max_len=16, device="cpu", dtype=torch.float32)
    if writer_rows:
        kv.writer = HostKVWriter(kv, writer_rows, buffers=2)
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
        batch = decode_batch(kv, order, lengths, micro_batch, torch.device("cpu"), copy_kv=bool(writer_rows))
        got, _ = decode_attention(kv, layer, qd, kd, vd, batch, window)
        for j, s in enumerate(order):
            kk = torch.cat([keys[s][0], kd[j : j + 1]])
            vv = torch.cat([keys[s][1], vd[j : j + 1]])
            keys[s] = (kk, vv)
            expected = causal_attention(qd[j : j + 1], kk, vv, lengths[j], window)[0]
            torch.testing.assert_close(got[j], expected)
    kv.drain()
    for s, (kk, vv) in keys.items():  # every stored K/V is in place once the writer has drained
        torch.testing.assert_close(kv.k[layer][s, :, : len(kk)], kk.transpose(0, 1))
        torch.testing.assert_close(kv.v[layer][s, :, : len(vv)], vv.transpose(0, 1))
    assert torch.isfinite(kv.k[layer]).all()
    if writer_rows:
        assert kv.writer.rows_written == 14 + 3 * 3
        kv.writer.close()


def test_decode_attention_counts_the_kv_it_reads():
    # Slots 0..5, micro-batches of 4: [0..3] holds live slots 1 (length 5) and 3 (length 2), [4..5] slot 4
    # (length 7). Each micro-batch reads the span of its live slots (1..3, then 4) up to its longest live
    # context (+1 for the new token).
    sp = spec()
    kv = WaveKV(sp, slots=6, max_len=16, device="cpu", dtype=torch.float32)
    slots, lengths = [1, 3, 4], [5, 2, 7]
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    decode_attention(kv, 0, q, k, v, decode_batch(kv, slots, lengths, 4, torch.device("cpu")))
    row = 2 * 8 * 4  # kv heads x head dim x float32
    assert kv.read_bytes == 2 * (3 * 6 + 1 * 8) * row
    assert kv.copied_bytes == 0  # the KV is where the attention runs


@pytest.mark.parametrize("live", [[2, 3, 4], [7], [0, 5], list(range(8))])
def test_a_wide_micro_batch_copies_only_its_live_slots_span(live):
    # A micro-batch as wide as the wave (8 slots) while the wave fills or drains: only the span of the live
    # slots is copied to the attention's device, and the product is each live sequence's own attention.
    torch.manual_seed(len(live))
    sp = spec()
    kv = WaveKV(sp, slots=8, max_len=6, device="cpu", dtype=torch.float32)
    lengths = [1 + s % 4 for s in live]
    for s, n in zip(live, lengths):
        kv.k[0][s, :, :n], kv.v[0][s, :, :n] = torch.randn(2, n, 8), torch.randn(2, n, 8)
    q, k, v = torch.randn(len(live), 4, 8), torch.randn(len(live), 2, 8), torch.randn(len(live), 2, 8)
    batch = decode_batch(kv, live, lengths, 8, torch.device("cpu"), copy_kv=True)
    assert batch.ranges == [(live[0], live[-1] + 1, max(lengths) + 1)]
    got, _ = decode_attention(kv, 0, q, k, v, batch)
    row = 2 * 8 * 4
    assert kv.copied_bytes == 2 * (live[-1] + 1 - live[0]) * 6 * row  # whole slots on a CPU (no 2D copy)
    for j, (s, n) in enumerate(zip(live, lengths)):
        kk = torch.cat([kv.k[0][s, :, :n].transpose(0, 1), k[j : j + 1]])
        vv = torch.cat([kv.v[0][s, :, :n].transpose(0, 1), v[j : j + 1]])
        torch.testing.assert_close(got[j], causal_attention(q[j : j + 1], kk, vv, n)[0])


def test_host_kv_writer_stores_ragged_spans_and_tokens_like_direct_writes():
    # Fresh random spans of ragged lengths over buffers smaller than a step: the asynchronous store
    # must leave host KV exactly as synchronous writes do, across layers, in submission order.
    torch.manual_seed(7)
    sp = spec()
    direct = WaveKV(sp, slots=5, max_len=24, device="cpu", dtype=torch.float16)
    kv = WaveKV(sp, slots=5, max_len=24, device="cpu", dtype=torch.float16)
    writer = kv.writer = HostKVWriter(kv, rows=7, buffers=1)
    for layer in (0, 1, 0):
        lens = torch.randint(1, 20, (4,)).tolist()
        slots = torch.randperm(5)[:4].tolist()
        T = sum(lens)
        k, v = torch.randn(T, 2, 8).half(), torch.randn(T, 2, 8).half()
        writer.store_spans(layer, k, v, [(s, 0, n) for s, n in zip(slots, lens)])
        direct.write_spans(layer, k, v, [(s, 0, n) for s, n in zip(slots, lens)])
        pos = [n for n in lens]
        kt, vt = torch.randn(4, 2, 8).half(), torch.randn(4, 2, 8).half()
        writer.store_tokens(layer, kt, vt, slots, pos)
        direct.write_tokens(layer, torch.tensor(slots), torch.tensor(pos), kt, vt)
    kv.drain()
    for layer in range(2):
        assert torch.equal(kv.k[layer], direct.k[layer]) and torch.equal(kv.v[layer], direct.v[layer])
    writer.close()


def test_host_kv_writer_reports_a_failed_store_at_the_next_wait():
    sp = spec()
    kv = WaveKV(sp, slots=2, max_len=8, device="cpu", dtype=torch.float32)
    writer = HostKVWriter(kv, rows=4)
    writer.store_tokens(0, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), [5], [0])  # slot 5 of 2
    with pytest.raises(RuntimeError, match="storing K/V into host memory failed"):
        writer.settle(0)
    with pytest.raises(RuntimeError, match="storing K/V into host memory failed"):
        writer.store_tokens(1, torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), [0], [0])
    with pytest.raises(ValueError, match="spans cover 3 rows"):
        HostKVWriter(kv, rows=4).store_spans(0, torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), [(0, 0, 3)])
    writer.close()


def test_copied_ranges_use_this_steps_token_before_host_kv_has_it():
    # Host KV with device attention: the new token's K/V are patched into the copied range, so the
    # product must not depend on the (asynchronous) host store having landed. Here it never lands.
    torch.manual_seed(3)
    sp = spec()
    kv = WaveKV(sp, slots=4, max_len=8, device="cpu", dtype=torch.float32)
    kv.writer = HostKVWriter(kv, rows=8)
    held = []
    kv.writer.store_tokens = lambda *a: held.append(a)  # the store never reaches host KV
    slots, lengths = [2, 0], [3, 5]
    for s, n in zip(slots, lengths):
        kv.k[0][s, :, :n], kv.v[0][s, :, :n] = torch.randn(2, n, 8), torch.randn(2, n, 8)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    got, _ = decode_attention(kv, 0, q, k, v, decode_batch(kv, slots, lengths, 3, torch.device("cpu"), copy_kv=True))
    assert len(held) == 1 and torch.count_nonzero(kv.k[0][2, :, 3]) == 0  # host KV still lacks the token
    for j, (s, n) in enumerate(zip(slots, lengths)):
        kk = torch.cat([kv.k[0][s, :, :n].transpose(0, 1), k[j : j + 1]])
        vv = torch.cat([kv.v[0][s, :, :n].transpose(0, 1), v[j : j + 1]])
        torch.testing.assert_close(got[j], causal_attention(q[j : j + 1], kk, vv, n)[0])
    kv.writer.close()


def test_a_closed_host_kv_writer_lets_the_kv_go_and_restarts_on_use():
    # The writer's thread holds the host KV: once an engine is done it closes the writer, and nothing may
    # keep the KV (tens of GiB on a real run) alive after that. A later store starts a new thread.
    import gc
    import weakref

    sp = spec()
    kv = WaveKV(sp, slots=2, max_len=8, device="cpu", dtype=torch.float32)
    writer = kv.writer = HostKVWriter(kv, rows=4)
    k = torch.randn(1, 2, 8)
    writer.store_tokens(0, k, k, [1], [3])
    writer.close()
    assert torch.equal(kv.k[0][1, :, 3], k[0]) and writer._thread is None
    writer.store_tokens(1, k, k, [0], [2])  # restarts
    writer.settle(1)
    assert torch.equal(kv.v[1][0, :, 2], k[0])
    writer.close()
    gone = weakref.ref(kv.k[0])
    # Freed at once, not at the garbage collector's next run: the writer refers to its KV weakly (a
    # grid of engines pinned two points' host KV at a time and ran out of host memory).
    gc.disable()
    try:
        del kv, writer
        assert gone() is None
    finally:
        gc.enable()


def test_packed_kv_tensors_are_zeroed_disjoint_and_waste_little():
    # Host KV is packed into power-of-two chunks (the pinned allocator rounds each allocation up): every
    # layer's K and V must still be its own zeroed memory, and the chunks little more than the tensors.
    shape = (5, 3, 7, 4)  # 420 elements: not a power of two
    ts = WaveKV._pinned_tensors(shape, 10, torch.float16, pin=False)
    assert len(ts) == 10 and all(t.shape == shape and t.dtype == torch.float16 for t in ts)
    assert all(t.count_nonzero() == 0 for t in ts)
    for i, t in enumerate(ts):
        t.fill_(i + 1)
    assert [t.unique().tolist() for t in ts] == [[float(i + 1)] for i in range(10)]
    from offbatch.offload.weights import pinned_bytes

    raw = 10 * 420 * 2
    assert raw <= pinned_bytes([420 * 2] * 10) <= 1.25 * raw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_host_kv_is_pinned_and_packed():
    kv = WaveKV(spec(), slots=3, max_len=10, device="cpu", dtype=torch.bfloat16, pin=True)
    assert all(t.is_pinned() and t.count_nonzero() == 0 for t in kv.k + kv.v)
    assert len({t.data_ptr() for t in kv.k + kv.v}) == 4
