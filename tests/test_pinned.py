"""Page-locked host buffers registered in place (offbatch/offload/pinned.py): zeroed, pinned, copied at the
link's rate like torch's; alive while any view of them is; unregistered once the last one is gone; and the
store's and host KV's chunks hold only what they carry."""

import gc

import pytest
import torch

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]


def test_registered_buffers_are_pinned_zeroed_and_released_with_their_last_view(monkeypatch):
    from offbatch.offload import pinned

    released = []
    original = pinned._LockedMapping.__del__

    def spy(self):
        released.append(self.ptr)
        original(self)

    monkeypatch.setattr(pinned._LockedMapping, "__del__", spy)
    n = (3 << 20) + 123  # not a page multiple
    t = pinned.pinned_zeros(n)
    assert t.numel() == n and t.is_pinned() and not t.any()
    t.copy_(torch.arange(n, dtype=torch.int64).to(torch.uint8))
    dev = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), t)
    ptr = t.data_ptr()
    view = t[100:200]
    del t
    gc.collect()
    assert released == [] and view.is_pinned() and int(view[0]) == 100  # the view keeps the mapping
    del view
    gc.collect()
    assert released == [ptr]


def test_off_switch_takes_torchs_allocator(monkeypatch):
    from offbatch.offload import pinned

    monkeypatch.setenv("OFFBATCH_PIN_REGISTER", "0")
    t = pinned.pinned_zeros(1 << 20)
    assert t.is_pinned() and not t.any()


def test_store_chunks_hold_what_they_carry():
    from offbatch.models.spec import spec_from_config
    from offbatch.offload.weights import SynthSource, WeightStore, pack_pinned
    from offbatch.tools.synth import synth_config

    spec = spec_from_config(synth_config("llama", layers=2))
    store = WeightStore(SynthSource(spec), torch.bfloat16, pin=True)
    sizes, place = pack_pinned([store.nbytes(k) for k in store.keys() if k[1] != "embed"])
    assert len(store.chunks) == len(sizes) and all(c.is_pinned() for c in store.chunks)
    assert sum(c.numel() for c in store.chunks) == sum(store.nbytes(k) for k in store.keys() if k[1] != "embed")
