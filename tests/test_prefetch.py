"""Slot rings: modules land in slots in schedule order, a slot is refilled only after release, and a
module scheduled again while an old copy of it lingers in another slot still resolves to the new one."""

import pytest
import torch

from offbatch.formats import DENSE
from offbatch.offload.prefetch import Prefetcher


class FakeStore:
    """Modules (layer, 'expert.e') of 4 floats each, value = 10*layer + e."""

    format = DENSE

    def __init__(self, layers=2, experts=4):
        self.layouts, self.host = {}, {}
        for i in range(layers):
            for e in range(experts):
                key = (i, f"expert.{e}")
                layout = DENSE.layout([("w", (4,))], torch.float32)
                flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
                layout.views(flat)["w"].fill_(10 * i + e)
                self.layouts[key], self.host[key] = layout, flat

    def keys(self):
        return list(self.layouts)

    def nbytes(self, key):
        return self.layouts[key].nbytes


def use(pf, key):
    value = pf.acquire(key)["w"][0].item()
    pf.release(key)
    return value


def test_schedule_acquire_release_in_rings():
    pf = Prefetcher(FakeStore(), "cpu", {"expert": 3}, resident=set())
    keys = [(i, f"expert.{e}") for i in range(2) for e in range(4)]
    for step in range(3):
        pf.schedule(keys)
        assert [use(pf, k) for k in keys] == [10 * i + e for i in range(2) for e in range(4)]
    assert pf.stats.copies == 3 * len(keys)


def test_stale_copy_in_another_slot_does_not_hide_the_new_one():
    pf = Prefetcher(FakeStore(layers=1, experts=2), "cpu", {"expert": 3}, resident=set())
    a, b = (0, "expert.0"), (0, "expert.1")
    # a lands in slot 0, b in slot 1; then a again in slot 2; then b in slot 0, overwriting the stale a.
    pf.schedule([a, b])
    assert use(pf, a) == 0 and use(pf, b) == 1
    pf.schedule([a, b])
    assert use(pf, a) == 0 and use(pf, b) == 1
    pf.schedule([a])
    assert use(pf, a) == 0


def test_unschedule_skips_unused_experts_and_frees_their_slots():
    pf = Prefetcher(FakeStore(layers=1, experts=4), "cpu", {"expert": 2}, resident=set())
    keys = [(0, f"expert.{e}") for e in range(4)]
    pf.schedule(keys)  # experts 0 and 1 copied at once, 2 and 3 wait for slots
    pf.unschedule({keys[1], keys[2]})
    assert pf.stats.wasted_bytes == pf.store.nbytes(keys[1])
    assert use(pf, keys[0]) == 0 and use(pf, keys[3]) == 3
    with pytest.raises(RuntimeError, match="before it was scheduled"):
        pf.acquire(keys[2])


def test_resident_modules_are_never_copied_again():
    store = FakeStore(layers=1, experts=2)
    pf = Prefetcher(store, "cpu", {"expert": 2}, resident={(0, "expert.0")})
    pf.schedule([(0, "expert.0"), (0, "expert.1")])
    assert use(pf, (0, "expert.0")) == 0 and use(pf, (0, "expert.1")) == 1
    assert pf.stats.copies == 1
