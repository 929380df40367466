"""MoE experts through the grouped kernels: the engine runs each chunk of experts in one grouped_swiglu +
grouped_gemm launch over their sorted rows, with weights read in place from the slot ring's bank or a
layer's resident bank. Greedy tokens equal the reference with the Triton kernels really running (on the
CPU through the Triton interpreter), and the chunking, windows and banks are checked on their own."""

import dataclasses

import pytest
import torch
from triton_support import triton_kernel_module

from hf_factory import save_hf_model
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.ffn.moe_grouped import Chunk, expert_items, plan_chunks, windows
from offbatch.engine.streaming import LiveSeq, StreamingEngine
from offbatch.formats import DENSE
from offbatch.kernels import reference
from offbatch.engine.reference import ReferenceModel
from offbatch.offload.prefetch import Prefetcher

CUDA = torch.cuda.is_available()
PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99], [7, 7, 7]]
NEW = 5
# Smaller than hf_factory's TINY: the interpreter runs every Triton program in numpy.
SMALL = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def small_model(family, path):
    """Save the model; return the reference's greedy tokens and last-token logits of the prompts."""
    save_hf_model(family, path, **SMALL)
    ref = ReferenceModel.load(path, dtype="float32")
    return ref.greedy(PROMPTS, NEW), ref.forward([ref.new_cache() for _ in PROMPTS], PROMPTS)


def engine(path, device, residency, expert_slots):
    """An engine with the placement pinned: only routers resident ("streamed"), or also two experts of
    layer 0 and all of layer 1 ("mixed": chunks then switch between the ring and resident banks)."""
    base = engine_for_folder(path, device=device, dtype="float32", num_requests=len(PROMPTS), max_len=24,
                             prefill_tokens=12, attn_micro_batch=2, ffn_micro_tokens=8)
    keys = base.store.keys()
    resident = {k for k in keys if k[1] == "router"}
    if residency == "mixed":
        resident |= {(0, "expert.0"), (0, "expert.2")} | {k for k in keys if k[0] == 1 and k[1].startswith("expert.")}
    kinds = {"attn", "ffn", "shared", "head", "expert"} & {k[1].split(".")[0] for k in keys}
    slots = {kind: 2 for kind in kinds} | {"head": 1, "expert": expert_slots}
    return StreamingEngine(base.store, dataclasses.replace(base.plan, resident=resident, slots=slots))


def generate(eng):
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    return [outs[i] for i in range(len(PROMPTS))]


def prefill_logits(eng):
    """One step prefilling every prompt: 20 tokens, 40 routed rows, so several FFN windows per chunk. Greedy tokens
    alone are a weak check here (the residual stream dominates these tiny models); logits are not."""
    seqs = [LiveSeq(GenRequest(i, p, SamplingParams()), rng=None, slot=eng.kv.allocate()) for i, p in enumerate(PROMPTS)]
    logits = eng.step([], [(s, len(s.req.prompt_ids)) for s in seqs])
    for s in seqs:
        eng.kv.release(s.slot)
    return logits


def assert_close(got, expected, tol=1e-5):
    assert ((got - expected).norm() / expected.norm()).item() < tol


@pytest.fixture
def triton_kernels(monkeypatch):
    """The Triton module, interpreted on the CPU, with spies counting launches and groups per launch."""
    module = triton_kernel_module("grouped_gemm_triton", monkeypatch.setenv)
    groups: dict[str, list[int]] = {"grouped_swiglu": [], "grouped_gemm": []}
    swiglu, gemm = module.grouped_swiglu, module.grouped_gemm

    def swiglu_spy(x, w_gate, w_up, group_offsets, group_slots, out=None):
        groups["grouped_swiglu"].append(group_slots.numel())
        return swiglu(x, w_gate, w_up, group_offsets, group_slots, out)

    def gemm_spy(x, w, group_offsets, group_slots, out=None):
        groups["grouped_gemm"].append(group_slots.numel())
        return gemm(x, w, group_offsets, group_slots, out)

    monkeypatch.setattr(module, "grouped_swiglu", swiglu_spy)
    monkeypatch.setattr(module, "grouped_gemm", gemm_spy)
    return groups


CASES = [("mixtral", "streamed", 3), ("qwen2_moe", "streamed", 3), ("qwen3_moe", "mixed", 4), ("olmoe", "streamed", 2)]


@pytest.mark.skipif(CUDA, reason="with a GPU, the gpu-marked test below runs these kernels compiled")
@pytest.mark.parametrize("family,residency,expert_slots", CASES)
def test_triton_experts_give_reference_greedy(family, residency, expert_slots, tmp_path, triton_kernels):
    import offbatch.kernels

    expected, logits = small_model(family, tmp_path)
    eng = engine(tmp_path, "cpu", residency, expert_slots)
    assert eng.experts is not None and eng.experts.kernels is reference  # the CPU default: torch twins
    eng.experts.kernels = offbatch.kernels  # dispatches to Triton: TRITON_INTERPRET=1
    assert generate(eng) == expected
    assert_close(prefill_logits(eng), logits)
    swiglu, gemm = triton_kernels["grouped_swiglu"], triton_kernels["grouped_gemm"]
    assert len(swiglu) == len(gemm) == eng.experts.launches > 0
    # Streamed chunks hold ring size - 1 experts; resident chunks any number.
    # Streamed chunks hold ring size - 1 experts (one slot keeps copying); a resident layer's
    # experts (all 4 of layer 1 in "mixed") run in one launch.
    assert max(swiglu) == (4 if residency == "mixed" else expert_slots - 1)
    assert eng.pf.stats.copies > 0 and eng.pf.ring_size("expert") == expert_slots


@pytest.mark.gpu
@pytest.mark.parametrize("family,residency,expert_slots", CASES)
def test_gpu_triton_experts_give_reference_greedy(family, residency, expert_slots, tmp_path, triton_kernels,
                                                  monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference's products: exact fp32
    expected, logits = small_model(family, tmp_path)
    eng = engine(tmp_path, "cuda", residency, expert_slots)
    assert generate(eng) == expected
    assert_close(prefill_logits(eng), logits.cuda(), tol=1e-4)
    assert len(triton_kernels["grouped_swiglu"]) == eng.experts.launches > 0


def test_cpu_engine_uses_the_torch_twins_by_default(tmp_path):
    expected, logits = small_model("qwen3_moe", tmp_path)
    eng = engine(tmp_path, "cpu", "mixed", 3)
    assert eng.experts.kernels is reference
    assert generate(eng) == expected and eng.experts.launches > 0
    assert_close(prefill_logits(eng), logits)


# ---- the pieces --------------------------------------------------------------------------------
def test_chunks_are_consecutive_experts_of_one_bank_within_the_ring():
    ring, res = object(), object()
    bank = {0: ring, 1: ring, 2: res, 3: res, 4: ring, 5: ring, 6: ring}
    counts = [2, 0, 3, 1, 0, 4, 1]  # experts 1 and 4 got no tokens
    chunks = plan_chunks(counts, bank.__getitem__, lambda b: 2 if b is ring else 99)
    assert chunks == [Chunk((0,), (0, 2)), Chunk((2, 3), (2, 5, 6)), Chunk((5, 6), (6, 10, 11))]
    # Expert 0 and 5 share the ring but expert 2 (resident) sits between them: separate chunks.
    assert plan_chunks([0, 0], bank.__getitem__, lambda b: 1) == []
    assert [c.experts for c in plan_chunks([1] * 5, lambda e: ring, lambda b: 2)] == [(0, 1), (2, 3), (4,)]


def test_windows_clip_groups_and_drop_empty_ones():
    # Groups (bank rows 7, 3, 5) own sorted rows 10:13, 13:14, 14:20; windows of 4 rows.
    got = list(windows((10, 13, 14, 20), [7, 3, 5], 4))
    assert got == [(10, 14, [0, 3, 4], [7, 3]), (14, 18, [0, 4], [5]), (18, 20, [0, 2], [5])]
    assert list(windows((0, 5), [1], 100)) == [(0, 5, [0, 5], [1])]


EXPERT_SHAPE = type("MoE", (), {"expert_intermediate_size": 3})()  # TwoLayerExperts' experts: [3, 2] / [2, 3]


class TwoLayerExperts:
    """A store of 2 layers x 4 experts, gate/up [3, 2] and down [2, 3], each filled with its id."""

    format = DENSE

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype
        self.layouts, self.host = {}, {}
        for i in range(2):
            for e in range(4):
                p = f"experts.{e}."
                layout = DENSE.layout([(p + "gate.weight", (3, 2)), (p + "up.weight", (3, 2)), (p + "down.weight", (2, 3))],
                                      dtype)
                flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
                for t in layout.views(flat).values():
                    t.copy_(torch.arange(t.numel(), dtype=dtype).view(t.shape) + 100 * i + 10 * e)
                self.layouts[(i, f"expert.{e}")], self.host[(i, f"expert.{e}")] = layout, flat

    def keys(self):
        return list(self.layouts)

    def nbytes(self, key):
        return self.layouts[key].nbytes


def test_banks_stack_ring_slots_and_a_layers_resident_experts():
    store = TwoLayerExperts()
    resident = {(0, "expert.1"), (0, "expert.3")}
    pf = Prefetcher(store, "cpu", {"expert": 3}, resident)
    spec = type("Spec", (), {"moe": EXPERT_SHAPE, "hidden_size": 2, "gated_ffn": True, "activation": "silu"})()
    items = expert_items(spec, store)
    assert [it.name for it in items] == ["down.weight", "gate.weight", "up.weight"]
    streamed = [(1, f"expert.{e}") for e in range(3)]
    pf.schedule(streamed)
    ring = pf.banks["expert"]
    assert ring.shape == (3, store.nbytes(streamed[0])) and pf.device_bytes == ring.numel() + 2 * ring.shape[1]
    for key in streamed + sorted(resident):
        views = pf.acquire(key)
        bank, row = pf.row_of(key)
        assert bank is pf.bank_of(key) and (bank is ring) == (key not in resident)
        w = DENSE.expert_stacks(bank, items)
        prefix = f"experts.{key[1].split('.')[1]}."
        for name in ("gate.weight", "up.weight", "down.weight"):
            assert w[name].shape[0] == bank.shape[0]
            assert torch.equal(w[name][row], views[prefix + name])
    r1, r3 = pf.row_of((0, "expert.1")), pf.row_of((0, "expert.3"))
    assert r1[0] is r3[0] and {r1[1], r3[1]} == {0, 1}  # one bank for the layer's resident experts


def test_a_chunk_holding_slots_still_gets_the_next_expert_after_unused_ones_left():
    # Ring of 3 filled with experts 0, 1, 2; 1 and 2 got no tokens and are dropped. A chunk holds
    # expert 0 and needs expert 3: it must land in a freed slot, not wait behind the held one.
    store = TwoLayerExperts()
    pf = Prefetcher(store, "cpu", {"expert": 3}, set())
    keys = [(0, f"expert.{e}") for e in range(4)]
    pf.schedule(keys)
    pf.unschedule({keys[1], keys[2]})
    pf.acquire(keys[0])
    assert pf.acquire(keys[3])["experts.3.gate.weight"][0, 0].item() == 30
    assert pf.row_of(keys[0])[1] != pf.row_of(keys[3])[1]


def test_grouped_path_only_for_gated_silu_experts_without_extras():
    store = TwoLayerExperts()
    gated = dict(moe=EXPERT_SHAPE, hidden_size=2, gated_ffn=True, activation="silu")
    make = lambda **kw: type("Spec", (), dict(gated, **kw))()
    assert expert_items(make(), store) is not None
    assert expert_items(make(activation="gelu"), store) is None
    assert expert_items(make(gated_ffn=False), store) is None
    assert expert_items(make(moe=None), store) is None
    biased = TwoLayerExperts()
    key = (1, "expert.2")
    names = [(it.name, it.shape) for it in biased.layouts[key].items] + [("experts.2.up.bias", (3,))]
    biased.layouts[key] = DENSE.layout(names, torch.float32)
    assert expert_items(make(), biased) is None
    assert expert_items(make(), TwoLayerExperts(torch.float64)) is None


def test_dense_model_has_no_grouped_experts(tmp_path):
    save_hf_model("llama", tmp_path, **SMALL)
    assert engine_for_folder(tmp_path, device="cpu", dtype="float32", num_requests=1, max_len=16).experts is None
