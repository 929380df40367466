"""Host KV copied to the device for decode attention: the 2D copy of live positions (offload/copy2d.py)
and the fetcher that issues copies one range ahead on a stream of their own (offload/kv_fetch.py)."""

import pytest
import torch

from offbatch.models.spec import ModelSpec
from offbatch.offload import copy2d
from offbatch.offload.kv import WaveKV, kv_format
from offbatch.offload.kv_fetch import RangeFetcher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def spec(layers=3, kv_heads=2, head_dim=16):
    return ModelSpec(family="llama", vocab_size=64, hidden_size=kv_heads * 2 * head_dim, num_layers=layers,
                     num_heads=kv_heads * 2, num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=64,
                     max_position=256)


def filled(sp, slots, max_len, device, fmt="dense", pin=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = WaveKV(sp, slots, max_len, device, torch.float32 if fmt == "dense" else torch.float16, pin=pin,
                fmt=kv_format(fmt, torch.float32 if fmt == "dense" else torch.float16))
    for layer in range(sp.num_layers):
        for t in (kv.k[layer], kv.v[layer]):
            if kv.packed:
                t.copy_(torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8))
            else:
                t.copy_(torch.randn(t.shape, generator=g))
    return kv


def test_rows_at_one_pitch_are_checked():
    t = torch.zeros(4, 3, 10, 8)
    assert copy2d._rows(t[1:3]) == (6, 10 * 8 * 4)
    assert copy2d._rows(t[:, 1]) == (4, 3 * 10 * 8 * 4)  # one head of each slot: rows at the slot pitch
    with pytest.raises(ValueError, match="not rows at one pitch"):
        copy2d._rows(t[:, :2])  # two heads of each slot: two pitches
    with pytest.raises(ValueError, match="do not match"):
        copy2d.copy_prefix(torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 5, 4), 3)
    with pytest.raises(ValueError, match="beyond"):
        copy2d.copy_prefix(torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 9, 8), 6)


@pytest.mark.parametrize("fmt", ["dense", "int4"])
def test_fetcher_gives_each_layer_and_range_what_the_store_holds(fmt):
    # On one device (the CPU) the fetcher copies synchronously into one buffer pair; every (layer, range)
    # taken in the engine's order is the store's own view of it.
    sp = spec()
    kv = filled(sp, 10, 12, "cpu", fmt)
    ranges = [(0, 4, 7), (4, 8, 12), (8, 10, 3)]
    f = RangeFetcher(kv, ranges, torch.device("cpu"))
    assert len(f.buffers) == 1 and f.stream is None and not f.live
    for layer in range(sp.num_layers):
        for r, (a, b, L) in enumerate(ranges):
            kk, vv = f.take(layer, r)
            ek, ev = kv.k[layer][a:b, :, :L], kv.v[layer][a:b, :, :L]
            assert kk.shape == ek.shape and torch.equal(kk, ek) and torch.equal(vv, ev)
            f.done()
    assert kv.copied_bytes == 2 * 10 * 12 * kv.row_bytes * sp.num_layers  # whole slots without the 2D copy


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8, torch.float32])
def test_copy_prefix_equals_slicing_on_the_gpu(dtype):
    torch.manual_seed(1)
    for slots, heads, P, R, length in [(7, 3, 33, 40, 17), (1, 1, 5, 8, 5), (64, 8, 96, 128, 1), (5, 2, 300, 68, 299)]:
        src = (torch.randint(0, 256, (slots + 3, heads, P, R), dtype=torch.uint8) if dtype == torch.uint8
               else torch.randn(slots + 3, heads, P, R).to(dtype)).pin_memory()
        dst = torch.full((slots, heads, P, R), 7, dtype=dtype, device="cuda")
        copy2d.copy_prefix(dst, src[2 : 2 + slots], length)
        torch.cuda.synchronize()
        assert torch.equal(dst[:, :, :length].cpu(), src[2 : 2 + slots, :, :length])
        assert (dst[:, :, length:] == 7).all()  # nothing beyond the prefix written


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("stream", ["1", "0"])
@pytest.mark.parametrize("fmt", ["dense", "int8"])
def test_fetcher_on_the_gpu_copies_live_positions_one_range_ahead(monkeypatch, stream, fmt):
    monkeypatch.setenv("OFFBATCH_KV_COPY_STREAM", stream)
    sp = spec(layers=4, kv_heads=2, head_dim=64)
    kv = filled(sp, 24, 40, "cpu", fmt, pin=True, seed=3)
    ranges = [(0, 8, 33), (8, 16, 40), (16, 24, 5)]
    f = RangeFetcher(kv, ranges, torch.device("cuda"))
    assert (f.stream is not None) == (stream == "1") and len(f.buffers) == (2 if stream == "1" else 1)
    assert f.live == copy2d.available()
    for layer in range(sp.num_layers):
        for r, (a, b, L) in enumerate(ranges):
            kk, vv = f.take(layer, r)
            # Work on the compute stream after the take sees the copy (the attention patches it in place).
            got_k, got_v = kk.clone().cpu(), vv.clone().cpu()
            f.done()
            assert torch.equal(got_k, kv.k[layer][a:b, :, :L]) and torch.equal(got_v, kv.v[layer][a:b, :, :L])
    live = sum(2 * (b - a) * L for a, b, L in ranges) * kv.row_bytes * sp.num_layers
    assert kv.copied_bytes == (live if f.live else 2 * 24 * 40 * kv.row_bytes * sp.num_layers)
