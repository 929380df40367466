"""A backend is one file and a registration: a toy attention backend and a toy FFN backend, registered
from this file alone, run the streaming engine on the CPU with the reference's greedy tokens.

The toy attention keeps the device-kv backend's KV store and slots but attends its own way: plain
torch, one sequence at a time, softmax written out, K/V read back through the KV store's API. The toy
FFN backend runs MoE layers' experts one at a time (the loop's modules) with the routing done here."""

import dataclasses
import math

import pytest
import torch

from hf_factory import save_hf_model
from offbatch.attention.backend import ATTENTION_BACKENDS, get_attention, register_attention
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.engine.streaming import StreamingEngine
from offbatch.ffn import FFN_BACKENDS, layer_modules, register_ffn
from offbatch.ffn.moe import MoEBackend
from offbatch.models import layers as L
from offbatch.engine.reference import ReferenceModel

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3, 4, 5, 6], [99], list(range(1, 15)), [7, 7, 7]]
NEW = 8


def softmax_attention(q, k, v, q_pos, window):
    """q [t, nh, d] at positions q_pos [t]; k, v [nkv, L, d] at 0..L-1 -> [t, nh, d]."""
    rep = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)  # [nh, L, d]
    scores = torch.einsum("thd,hld->htl", q.float(), k.float()) / math.sqrt(q.shape[-1])
    kpos = torch.arange(k.shape[1])[None, :]
    mask = kpos <= q_pos[:, None]
    if window:
        mask &= kpos > q_pos[:, None] - window
    p = torch.softmax(scores.masked_fill(~mask[None], float("-inf")), dim=-1)
    return torch.einsum("htl,hld->thd", p, v.float()).to(q.dtype)


def toy_attention():
    base = get_attention("device-kv")

    class ToyAttention(base):
        name = "toy"
        calls = {"decode": 0, "prefill": 0}

        def decode(self, layer, q, k, v, step, lse=False):
            batch = step.decode
            self.kv.write_tokens(layer, batch.store_slots, batch.store_pos, k, v)
            outs = []
            for j, (slot, n) in enumerate(zip(batch.slots, batch.lengths)):
                kk, vv = self.kv.read(layer, slot, slot + 1, n + 1)
                outs.append(softmax_attention(q[j : j + 1], kk[0], vv[0], torch.tensor([n]), self.window))
            self.calls["decode"] += 1
            return torch.cat(outs), None

        def prefill(self, layer, q, k, v, step):
            self.kv.write_spans(layer, k, v, [(slot, 0, n) for slot, n in step.prefill])
            out, row = torch.empty_like(q), 0
            for slot, n in step.prefill:
                kk, vv = self.kv.read(layer, slot, slot + 1, n)
                out[row : row + n] = softmax_attention(q[row : row + n], kk[0], vv[0], torch.arange(n), self.window)
                row += n
            self.calls["prefill"] += 1
            return out

    return register_attention(ToyAttention)


class ToyMoE(MoEBackend):
    """Experts one at a time, each over all of its tokens at once, weights summed per token here."""

    name = "toy-moe"
    calls = 0

    def experts(self, layer, h, order, counts, flat_w, out):
        k = self.spec.moe.top_k
        start = 0
        for e, n in enumerate(counts):
            if n:
                sel = order[start : start + n]
                start += n
                we = self.mods.acquire((layer, f"expert.{e}"))
                out.index_add_(0, sel // k, L.mlp(h[sel // k], we, self.spec, f"experts.{e}.") * flat_w[sel, None])
                self.mods.release((layer, f"expert.{e}"))
        ToyMoE.calls += 1


@pytest.fixture
def toy():
    cls = toy_attention()
    yield cls
    ATTENTION_BACKENDS.pop("toy", None)


@pytest.fixture
def toy_moe():
    yield register_ffn(ToyMoE)
    FFN_BACKENDS.pop("toy-moe", None)


def generate(eng):
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    return [outs[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("family", ["mistral", "qwen2_moe"])  # GQA and a sliding window; MoE with a shared expert
def test_toy_attention_backend_gives_reference_greedy(family, toy, tmp_path):
    save_hf_model(family, tmp_path)
    expected = ReferenceModel.load(tmp_path, dtype="float32").greedy(PROMPTS, NEW)
    eng = engine_for_folder(tmp_path, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            prefill_tokens=16, attn_micro_batch=2, ffn_micro_tokens=8, max_wave=3,
                            plan_overrides={"attention": "toy"})
    assert isinstance(eng.attention, toy) and eng.kv is eng.attention.kv
    assert generate(eng) == expected
    assert toy.calls["decode"] > 0 and toy.calls["prefill"] > 0
    assert eng.kv.free == eng.plan.wave_size  # every slot back


def test_toy_ffn_backend_gives_reference_greedy(toy_moe, tmp_path):
    save_hf_model("qwen2_moe", tmp_path)
    expected = ReferenceModel.load(tmp_path, dtype="float32").greedy(PROMPTS, NEW)
    base = engine_for_folder(tmp_path, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                             prefill_tokens=16, ffn_micro_tokens=8, max_resident_bytes=0)
    eng = StreamingEngine(base.store, dataclasses.replace(base.plan, moe_ffn="toy-moe"))
    assert type(eng.ffns[True]) is ToyMoE and eng.experts is None
    calls = ToyMoE.calls
    assert generate(eng) == expected
    assert ToyMoE.calls > calls and eng.pf.stats.bytes_copied > 0


def test_step_schedule_is_the_backends_declarations(tmp_path):
    """The prefetcher's step order is each layer's attention module, then its FFN backend's modules."""
    save_hf_model("qwen2_moe", tmp_path)
    eng = engine_for_folder(tmp_path, device="cpu", dtype="float32", num_requests=2, max_len=16)
    modules = layer_modules(eng.spec, eng.ffns[True].name)
    assert modules(0) == ["attn", "router", "shared"] + [f"expert.{e}" for e in range(eng.spec.moe.num_experts)]
    assert eng.order[: len(modules(0))] == [(0, m) for m in modules(0)] and eng.order[-1] == (-1, "head")
    assert len(eng.order) == len(eng.store.keys()) - 1  # every module but the embedding (host-side)


def test_moe_backend_choice(monkeypatch, tmp_path):
    from offbatch.ffn import choose_moe
    from offbatch.models.loader import open_checkpoint

    save_hf_model("qwen2_moe", tmp_path / "moe")
    save_hf_model("llama", tmp_path / "dense")
    moe, dense = open_checkpoint(tmp_path / "moe").spec, open_checkpoint(tmp_path / "dense").spec
    assert choose_moe(dense, torch.float32) == ""
    assert choose_moe(moe, torch.float32) == "moe-grouped" and choose_moe(moe, torch.float64) == "moe-loop"
    monkeypatch.setenv("OFFBATCH_GROUPED_EXPERTS", "0")  # the escape hatch, at plan and at run time
    assert choose_moe(moe, torch.float32) == "moe-loop"
    eng = engine_for_folder(tmp_path / "moe", device="cpu", dtype="float32", num_requests=2, max_len=16)
    assert eng.ffns[True].name == "moe-loop" and eng.experts is None
    eng = StreamingEngine(eng.store, dataclasses.replace(eng.plan, moe_ffn="moe-grouped"))
    assert eng.ffns[True].name == "moe-loop"
