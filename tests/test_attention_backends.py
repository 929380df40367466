"""Attention backends: the runtime calls (attend, decode with its log-sum-exp), the planner's terms
against what the KV store really allocates, the solver's search over registered backends, and the plan
file's backend fields."""

import json

import pytest
import torch

from offbatch.attention import ATTENTION_BACKENDS, DeviceKV, HostKVCPU, HostKVGPU, attention_names, get_attention
from offbatch.attention.dense import merge_by_lse
from offbatch.attention.wave import decode_attention, decode_batch, prefill_attention
from offbatch.errors import PlanFileError
from offbatch.models.layers import causal_attention
from offbatch.models.spec import ModelSpec, spec_from_config
from offbatch.offload.kv import WaveKV, kv_format
from offbatch.offload.kv_writer import HostKVWriter, staging_rows
from offbatch.plan import Plan
from offbatch.planner.memory import Knobs
from offbatch.planner.shape import shape_from_spec
from offbatch.planner.solve import make_plan
from offbatch.planner.workload import Workload
from offbatch.tools.synth import synth_config

NH, NKV, D = 4, 2, 8


def spec():
    return ModelSpec(family="llama", vocab_size=10, hidden_size=NH * D, num_layers=2, num_heads=NH,
                     num_kv_heads=NKV, head_dim=D, intermediate_size=8, max_position=64)


def plan(wave=4, max_len=16, mb=2, attention="device-kv"):
    return Plan(device="cpu", dtype=torch.float32, wave_size=wave, max_len=max_len, prefill_tokens=16,
                attn_micro_batch=mb, ffn_micro_tokens=8, attention=attention)


def run_step(backend, layer, decode, prefill):
    """One step through backend.attend: decode [(slot, length, q, k, v)], prefill [(slot, q, k, v)]."""
    step = backend.begin_step([s for s, *_ in decode], [n for _, n, *_ in decode],
                              [(s, q.shape[0]) for s, q, _, _ in prefill], [list(range(len(prefill)))])
    rows = [(q, k, v) for _, _, q, k, v in decode] + [(q, k, v) for _, q, k, v in prefill]
    q, k, v = (torch.cat([r[i].reshape(-1, *r[i].shape[-2:]) for r in rows]) for i in range(3))
    return backend.attend(layer, q, k, v, step)


# ---- runtime ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["device-kv", "host-kv-gpu", "host-kv-cpu"])
def test_attend_runs_decode_rows_then_prompts_like_per_sequence_attention(name):
    # On a CPU compute device every backend keeps the KV in the device's memory (no writer thread) and
    # must attend exactly as per-sequence causal attention does, decode rows first, then the prompts.
    torch.manual_seed(0)
    be = get_attention(name)(spec(), plan(attention=name), "cpu", torch.float32)
    assert be.kv.device.type == "cpu" and be.kv.writer is None and be.attention_device.type == "cpu"
    assert be.modules(be.spec, 0) == ["attn"]
    a, b, c = be.allocate(), be.allocate(), be.allocate()
    assert be.free == 1
    keys = {}
    prompts = {a: 5, b: 3}
    pre = [(s, torch.randn(n, NH, D), torch.randn(n, NKV, D), torch.randn(n, NKV, D)) for s, n in prompts.items()]
    out = run_step(be, 1, [], pre)
    row = 0
    for s, q, k, v in pre:
        torch.testing.assert_close(out[row : row + len(q)], causal_attention(q, k, v, 0))
        keys[s] = (k, v)
        row += len(q)
    # The next step: both decode, and a third prompt is admitted beside them.
    dec = [(s, prompts[s], torch.randn(1, NH, D), torch.randn(1, NKV, D), torch.randn(1, NKV, D)) for s in (b, a)]
    third = [(c, torch.randn(4, NH, D), torch.randn(4, NKV, D), torch.randn(4, NKV, D))]
    out = run_step(be, 1, dec, third)
    for j, (s, n, q, k, v) in enumerate(dec):
        kk, vv = torch.cat([keys[s][0], k]), torch.cat([keys[s][1], v])
        torch.testing.assert_close(out[j], causal_attention(q, kk, vv, n)[0])
    _, q, k, v = third[0]
    torch.testing.assert_close(out[2:], causal_attention(q, k, v, 0))
    assert be.read_bytes > 0 and be.copied_bytes == 0 and be.host_blocked_s == 0.0 and be.store_wait_s == 0.0
    be.release(a)
    assert be.free == 2
    be.drain()
    be.close()


def lse_of(q, k, n):
    """log-sum-exp of q's scaled scores over keys 0..n of k [nkv, L, d], head h on KV head h // rep."""
    k = k[:, : n + 1].repeat_interleave(NH // NKV, dim=0)  # [nh, n+1, d]
    return torch.logsumexp(torch.einsum("hd,hld->hl", q.float(), k.float()) / D ** 0.5, dim=-1)


@pytest.mark.parametrize("copied", [False, True])
def test_two_partial_decode_attentions_merge_by_their_lse_into_the_full_one(copied):
    # The keys of each sequence split in two: one store holds the first part (its last key passed as
    # this step's token), another the rest (with the real new token). Each decode returns its output and
    # log-sum-exp; merged by lse they equal decode over all the keys. copied: the host-KV path with its
    # ranges copied and the new token patched in (here on one device).
    torch.manual_seed(1)
    lengths, cuts = [7, 3, 10], [4, 2, 1]  # sequence j: keys 0..lengths[j] (the last one new), split at cuts[j]
    keys = [(torch.randn(n + 1, NKV, D), torch.randn(n + 1, NKV, D)) for n in lengths]
    q = torch.randn(len(lengths), NH, D)

    def decode(parts):
        """parts[j] = (first key, last key + 1) of sequence j's part; the part's last key is the step's."""
        kv = WaveKV(spec(), slots=4, max_len=16, device="cpu", dtype=torch.float32)
        if copied:
            kv.writer = HostKVWriter(kv, rows=16)
        slots, ns, new_k, new_v = [3, 0, 1], [], [], []
        for s, (k, v), (lo, hi) in zip(slots, keys, parts):
            if hi - 1 > lo:
                prefill_attention(kv, 0, torch.zeros(hi - 1 - lo, NH, D), k[lo : hi - 1], v[lo : hi - 1],
                                  [(s, hi - 1 - lo)], [[0]])
            ns.append(hi - 1 - lo)
            new_k.append(k[hi - 1])
            new_v.append(v[hi - 1])
        batch = decode_batch(kv, slots, ns, 2, torch.device("cpu"), copy_kv=copied)
        out = decode_attention(kv, 0, q, torch.stack(new_k), torch.stack(new_v), batch, lse=True)
        kv.close()
        return out

    full, full_lse = decode([(0, n + 1) for n in lengths])
    first = decode([(0, c) for c in cuts])
    second = decode([(c, n + 1) for c, n in zip(cuts, lengths)])
    merged, merged_lse = merge_by_lse([first[0], second[0]], [first[1], second[1]])
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(merged_lse, full_lse)
    assert full_lse.dtype == torch.float32 and full_lse.shape == (3, NH)
    for j, n in enumerate(lengths):  # the lse is that of the scaled scores, computed apart
        torch.testing.assert_close(full_lse[j], lse_of(q[j], keys[j][0].transpose(0, 1), n))
        expected = causal_attention(q[j : j + 1], keys[j][0], keys[j][1], n)[0]
        torch.testing.assert_close(full[j], expected)  # and the output is the exact path's


def test_backend_decode_returns_the_lse_only_when_asked():
    torch.manual_seed(2)
    be = DeviceKV(spec(), plan(), "cpu", torch.float32)
    s = be.allocate()
    k, v = torch.randn(3, NKV, D), torch.randn(3, NKV, D)
    be.prefill(0, torch.randn(3, NH, D), k, v, be.begin_step([], [], [(s, 3)], [[0]]))
    q, kn, vn = torch.randn(1, NH, D), torch.randn(1, NKV, D), torch.randn(1, NKV, D)
    out, lse = be.decode(0, q, kn, vn, be.begin_step([s], [3], [], []))
    assert lse is None
    again, lse = be.decode(0, q, kn, vn, be.begin_step([s], [3], [], []), lse=True)
    assert torch.equal(out, again)  # asking for the lse leaves the product as it was
    torch.testing.assert_close(lse[0], lse_of(q[0], torch.cat([k, kn]).transpose(0, 1), 3))


# ---- planner terms against the store -----------------------------------------------------------------------
def test_the_planners_kv_bytes_are_what_the_store_allocates():
    sp = spec_from_config(synth_config("mistral-7b", layers=3))
    shape = shape_from_spec(sp, torch.bfloat16)
    knobs = Knobs(wave=5, prefill_tokens=40, ffn_micro_tokens=64, attn_micro_batch=2)
    max_len = 24
    kv = WaveKV(sp, 5, max_len, "cpu", torch.bfloat16)
    assert DeviceKV.device_bytes(shape, knobs, max_len) == {"kv": kv.nbytes, "activations": 0}
    fmt = kv_format("dense", torch.bfloat16)
    assert fmt.bytes_per_token(sp) == 2 * 3 * sp.num_kv_heads * sp.head_dim * 2
    assert fmt.slot_bytes(sp, max_len) * 5 == kv.nbytes
    # Host KV (unpinned here): the store and the writer's staging ring, as the runtime builds them.
    writer = HostKVWriter(kv, staging_rows(knobs.prefill_tokens, max_len, knobs.wave))
    assert HostKVGPU.host_bytes(shape, replace_attention(knobs, "host-kv-gpu"), max_len, False) == (
        kv.nbytes + writer.staging_bytes)
    scores = 3 * 2 * sp.num_heads * max_len * 4  # CPU attention: float32 scores of a micro-batch, its output
    assert HostKVCPU.host_bytes(shape, knobs, max_len, False) == kv.nbytes + writer.staging_bytes + scores
    assert DeviceKV.host_bytes(shape, knobs, max_len, True) == 0
    # With GPU attention: the two pairs of K and V buffers a micro-batch's slot range is copied into
    # (one filled on the copy stream while the other is read: offload/kv_fetch.py).
    copies = 2 * sum(t.numel() * t.element_size() for t in kv.range_buffers(knobs.attn_micro_batch, "cpu"))
    assert HostKVGPU.device_bytes(shape, knobs, max_len)["kv"] == copies
    assert HostKVCPU.device_bytes(shape, knobs, max_len)["kv"] == 0


def replace_attention(knobs, name):
    from dataclasses import replace

    return replace(knobs, attention=name)


def test_backends_are_registered_simplest_first_and_gpu_only_ones_run_as_device_kv_on_a_cpu():
    assert attention_names()[:3] == ["device-kv", "host-kv-gpu", "host-kv-cpu"]
    assert [get_attention(n).rank for n in attention_names()[:3]] == [0, 1, 2]
    assert HostKVCPU.for_device("cpu") is DeviceKV and HostKVCPU.for_device("cuda") is HostKVCPU
    assert DeviceKV.for_device("cpu") is DeviceKV
    with pytest.raises(KeyError, match="unknown attention backend 'disk'.*device-kv"):
        get_attention("disk")


# ---- the solver and the plan --------------------------------------------------------------------------------
@pytest.fixture
def twin():
    """A backend registered from here: device-kv under another name and rank, priced the same."""

    class Twin(DeviceKV):
        name, rank = "twin-kv", 5

    ATTENTION_BACKENDS[Twin.name] = Twin
    yield Twin
    ATTENTION_BACKENDS.pop(Twin.name, None)


def test_the_solver_searches_registered_backends_and_keeps_the_simplest_on_a_tie(twin):
    sp, wl = spec_from_config(synth_config("llama")), Workload.uniform(8, 6, 3)
    base = make_plan(sp, torch.float32, "cpu", None, wl)
    assert base.attention == "device-kv" and base.near_tie is not None  # the twin ties it exactly
    assert base.near_tie["attention"] == "twin-kv" and base.near_tie["e2e_tok_s"] == base.predicted["e2e_tok_s"]
    pinned = make_plan(sp, torch.float32, "cpu", None, wl, attention="twin-kv")
    assert pinned.attention == "twin-kv" and pinned.predicted == base.predicted and pinned.near_tie is None
    twin.rank = -1  # now the simplest: it wins the tie
    assert make_plan(sp, torch.float32, "cpu", None, wl).attention == "twin-kv"
    with pytest.raises(KeyError, match="unknown attention backend"):
        make_plan(sp, torch.float32, "cpu", None, wl, attention="nowhere")


def test_a_plan_names_its_backends_and_formats_and_refuses_format_1():
    wl = Workload.uniform(16, 6, 3)
    moe = make_plan(spec_from_config(synth_config("mixtral")), torch.float32, "cpu", None, wl)
    dense = make_plan(spec_from_config(synth_config("llama")), torch.float32, "cpu", None, wl)
    assert (moe.weights, moe.kv_format, moe.moe_ffn) == ("dense", "dense", "moe-grouped")
    assert dense.moe_ffn == ""
    d = json.loads(json.dumps(moe.to_dict()))
    assert d["format"] == 2 and "kv_placement" not in d
    again = Plan.from_dict(d)
    assert (again.attention, again.weights, again.kv_format, again.moe_ffn) == (
        moe.attention, moe.weights, moe.kv_format, moe.moe_ffn)
    with pytest.raises(PlanFileError, match=r"plan file format 1 \(an older offbatch's plan.*make the plan again"):
        Plan.from_dict(dict(d, format=1))
    for field, value in (("attention", "gpu"), ("weights", "int3"), ("kv_format", "fp4"), ("moe_ffn", "dense")):
        with pytest.raises(PlanFileError, match=f"a plan's {field} is .*, not '{value}'"):
            Plan.from_dict(dict(d, **{field: value}))
