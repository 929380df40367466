"""Compressed KV (offload/kv.py's int8 / int4 formats) through the KV store and every attention backend,
and HGCA (attention/hgca.py): the stores keep what the twins encode, decode attends over exactly those
values (the new token's own key included), prefill stays exact, HGCA with every older key kept is
full attention and with fewer keeps its definition (attention/hgca_setting.py); the planner prices
the formats, offers a lossy one only where allowed, and writes both into plan files."""

import json

import pytest
import torch

from offbatch.attention import HGCA, get_attention
from offbatch.attention.hgca_setting import HGCASetting
from offbatch.errors import OffbatchError
from offbatch.kernels import kv_reference as ref
from offbatch.models.layers import causal_attention
from offbatch.models.spec import ModelSpec, spec_from_config
from offbatch.offload.kv import WaveKV, kv_format, kv_format_name
from offbatch.plan import Plan
from offbatch.planner.shape import shape_from_spec
from offbatch.planner.solve import make_plan
from offbatch.planner.workload import Workload
from offbatch.tools.synth import synth_config

NH, NKV, D = 6, 2, 64


def spec(window=None):
    return ModelSpec(family="llama", vocab_size=10, hidden_size=NH * D, num_layers=2, num_heads=NH,
                     num_kv_heads=NKV, head_dim=D, intermediate_size=8, max_position=256, sliding_window=window)


def plan(kv="dense", attention="device-kv", wave=4, max_len=48, mb=2, hgca=""):
    return Plan(device="cpu", dtype=torch.float32, wave_size=wave, max_len=max_len, prefill_tokens=64,
                attn_micro_batch=mb, ffn_micro_tokens=8, attention=attention, kv_format=kv, hgca=hgca)


def roundtrip(x, name):
    fmt = kv_format(name, torch.float32)
    return x if name == "dense" else fmt.decode(fmt.encode(x), D)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def run_step(backend, layer, decode, prefill):
    """One step through backend.attend (inputs on the CPU, moved to the backend's device; output back)."""
    step = backend.begin_step([s for s, *_ in decode], [n for _, n, *_ in decode],
                              [(s, q.shape[0]) for s, q, _, _ in prefill], [list(range(len(prefill)))] if prefill else [])
    rows = [(q, k, v) for _, _, q, k, v in decode] + [(q, k, v) for _, q, k, v in prefill]
    q, k, v = (torch.cat([r[i] for r in rows]).to(backend.device) for i in range(3))
    out = backend.attend(layer, q, k, v, step)
    return out.cpu()


# ---- formats and the store -------------------------------------------------------------------------------
def test_format_names_bytes_and_groups():
    assert kv_format_name("bf16") == "dense" and kv_format_name("INT4") == "int4"
    with pytest.raises(KeyError, match="known: dense"):
        kv_format_name("int3")
    s = spec()
    dense, i8, i4 = (kv_format(n, torch.bfloat16) for n in ("dense", "int8", "int4"))
    assert dense.row_bytes(s) == NKV * D * 2 and not dense.lossy
    assert i8.row_bytes(s) == NKV * (D + 4 * (D // 64)) and i8.lossy
    assert i4.row_bytes(s) == NKV * (D // 2 + 4 * (D // 32)) and i4.lossy
    assert i4.slot_bytes(s, 100) == 100 * 2 * s.num_layers * i4.row_bytes(s)
    assert i4.group_of(128) == 32 and i8.group_of(80) == 40 and i4.group_of(16) == 16
    g16 = kv_format("int4-g16", torch.bfloat16)  # other groups by name (Qwen2.5's keys want them: BENCHMARKS.md)
    assert g16.name == "int4-g16" and g16.group_of(128) == 16 and g16.row_bytes(s) == NKV * (D // 2 + 4 * (D // 16))
    assert kv_format_name("int4-g32") == "int4" and kv_format("int8-g32", torch.float32).group_of(64) == 32
    for bad in ("int4-g7", "int4-gx", "dense-g16"):
        with pytest.raises(KeyError):
            kv_format_name(bad)


@pytest.mark.parametrize("name", ["int8", "int4", "int4-g16"])
def test_store_keeps_the_encoded_rows_of_tokens_and_spans(name):
    torch.manual_seed(1)
    s = spec()
    kv = WaveKV(s, 3, 20, "cpu", torch.float32, fmt=kv_format(name, torch.float32))
    assert kv.packed and kv.k[0].dtype == torch.uint8 and kv.row_shape == (NKV, kv.row_width)
    k, v = torch.randn(7, NKV, D) * 3, torch.randn(7, NKV, D)
    kv.write_spans(1, k, v, [(2, 0, 4), (0, 5, 3)])
    kt, vt = torch.randn(2, NKV, D), torch.randn(2, NKV, D)
    kv.write_tokens(1, torch.tensor([2, 1]), torch.tensor([4, 9]), kt, vt)
    rk, rv = kv.read(1, 0, 3, 10)
    bits, group = kv.bits, kv.group
    assert torch.equal(rk[2, :, :4], ref.kv_encode(k[:4], bits, group).transpose(0, 1))
    assert torch.equal(rv[0, :, 5:8], ref.kv_encode(v[4:], bits, group).transpose(0, 1))
    assert torch.equal(rk[1, :, 9], ref.kv_encode(kt[1], bits, group))
    torch.testing.assert_close(kv.decode(rk[2, :, 4]), roundtrip(kt[0], name))
    assert kv.read_bytes == 2 * 3 * 10 * kv.row_bytes


# ---- backends ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["device-kv", "host-kv-gpu", "host-kv-cpu"])
@pytest.mark.parametrize("kv", ["int8", "int4", "int8-g16"])
def test_backends_decode_over_the_quantized_keys_and_prefill_exactly(name, kv, device):
    # On a GPU the host-KV backends keep the KV in pinned memory and store through the writer thread.
    torch.manual_seed(2)
    be = get_attention(name)(spec(), plan(kv=kv, attention=name), device, torch.float32)
    a, b = be.allocate(), be.allocate()
    prompts = {a: 5, b: 9}
    pre = [(s, torch.randn(n, NH, D), torch.randn(n, NKV, D), torch.randn(n, NKV, D)) for s, n in prompts.items()]
    out = run_step(be, 1, [], pre)
    row = 0
    for s, q, k, v in pre:  # prompts attend their own K/V as computed
        torch.testing.assert_close(out[row : row + len(q)], causal_attention(q, k, v, 0))
        row += len(q)
    keys = {s: (k, v) for s, _, k, v in pre}
    for _ in range(3):  # decode steps: every key and value as stored, the new token's own included
        dec = [(s, keys[s][0].shape[0], torch.randn(1, NH, D), torch.randn(1, NKV, D), torch.randn(1, NKV, D))
               for s in (b, a)]
        out = run_step(be, 1, dec, [])
        for j, (s, n, q, k, v) in enumerate(dec):
            kk, vv = torch.cat([keys[s][0], k]), torch.cat([keys[s][1], v])
            want = causal_attention(q, roundtrip(kk, kv), roundtrip(vv, kv), n)[0]
            torch.testing.assert_close(out[j], want, rtol=1e-4, atol=1e-5)
            keys[s] = (kk, vv)
    be.close()


def hgca_reference(q, kk, vv, setting: HGCASetting):
    """One decode query [nh, d] over keys kk/vv [n, nkv, d] by HGCA's definition: sinks and recent keys
    exactly, per query head the top_k older keys by score, one softmax over the union."""
    n = kk.shape[0]
    rep = NH // NKV
    sink_end, recent_start = setting.split(n)
    out = torch.empty_like(q)
    for h in range(NH):
        k_h, v_h = kk[:, h // rep], vv[:, h // rep]
        scores = (k_h @ q[h]) * D ** -0.5
        keep = torch.zeros(n, dtype=torch.bool)
        keep[:sink_end] = True
        keep[recent_start:] = True
        older = torch.arange(sink_end, recent_start)
        if len(older):
            top = scores[older].topk(min(setting.top_k, len(older))).indices
            keep[older[top]] = True
        p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=0)
        out[h] = p @ v_h
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv", ["dense", "int8"])
@pytest.mark.parametrize("setting", [HGCASetting(sinks=2, window=4, top_k=3), HGCASetting(sinks=0, window=3, top_k=1),
                                     HGCASetting(sinks=3, window=5, top_k=1000), HGCASetting(sinks=1, window=2, top_k=0)])
def test_hgca_decode_keeps_its_definition(kv, setting, device):
    # On a GPU: the window on the device, the whole KV in pinned host memory through the writer thread,
    # the older keys attended on the host threads while the GPU attends the window.
    torch.manual_seed(3)
    be = HGCA(spec(), plan(kv=kv, attention="hgca", hgca=str(setting)), device, torch.float32)
    slots = [be.allocate() for _ in range(3)]
    lens = dict(zip(slots, (6, 1, 13)))
    pre = [(s, torch.randn(n, NH, D), torch.randn(n, NKV, D), torch.randn(n, NKV, D)) for s, n in lens.items()]
    out = run_step(be, 0, [], pre)
    row = 0
    for s, q, k, v in pre:  # prefill stays exact
        torch.testing.assert_close(out[row : row + len(q)], causal_attention(q, k, v, 0))
        row += len(q)
    keys = {s: (k, v) for s, _, k, v in pre}
    for _ in range(9):
        dec = [(s, keys[s][0].shape[0], torch.randn(1, NH, D), torch.randn(1, NKV, D), torch.randn(1, NKV, D))
               for s in slots]
        out = run_step(be, 0, dec, [])
        for j, (s, n, q, k, v) in enumerate(dec):
            kk, vv = torch.cat([keys[s][0], k]), torch.cat([keys[s][1], v])
            want = hgca_reference(q[0], roundtrip(kk, kv), roundtrip(vv, kv), setting)
            torch.testing.assert_close(out[j], want, rtol=1e-4, atol=1e-5)
            keys[s] = (kk, vv)
    be.close()


def test_hgca_with_every_older_key_is_full_attention_and_refuses_sliding_windows():
    torch.manual_seed(4)
    setting = HGCASetting(sinks=1, window=2, top_k=10_000)
    be = HGCA(spec(), plan(attention="hgca", hgca=str(setting)), "cpu", torch.float32)
    s = be.allocate()
    q, k, v = torch.randn(20, NH, D), torch.randn(20, NKV, D), torch.randn(20, NKV, D)
    run_step(be, 0, [], [(s, q[:12], k[:12], v[:12])])
    for n in range(12, 20):
        out = run_step(be, 0, [(s, n, q[n : n + 1], k[n : n + 1], v[n : n + 1])], [])
        torch.testing.assert_close(out[0], causal_attention(q[n : n + 1], k[: n + 1], v[: n + 1], n)[0],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sliding window"):
        HGCA(spec(window=8), plan(attention="hgca", hgca=str(setting)), "cpu", torch.float32)


# ---- planner -----------------------------------------------------------------------------------------
def llama():
    return spec_from_config(synth_config("llama-3-8b"))


def test_planner_prices_kv_formats_and_takes_a_lossy_one_only_where_allowed():
    wl = Workload.uniform(256, 2048, 128)
    plans = {kv: make_plan(llama(), torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False,
                           kv_formats=[kv]) for kv in ("dense", "int8", "int4")}
    assert [p.kv_format for p in plans.values()] == ["dense", "int8", "int4"]
    dense, i8, i4 = (plans[k].predicted["decode_tok_s"] for k in ("dense", "int8", "int4"))
    assert i4 > i8 > dense  # fewer KV bytes per step on a KV-bound job
    default = make_plan(llama(), torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False)
    assert default.kv_format == "dense" and default.attention != "hgca"
    both = make_plan(llama(), torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False,
                     kv_formats=["dense", "int4"])
    assert both.kv_format == "int4"
    hg = make_plan(llama(), torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False,
                   hgca=HGCASetting(top_k=64), hgca_window_given=False, attention="hgca")
    assert hg.attention == "hgca" and HGCASetting.parse(hg.hgca).top_k == 64
    with pytest.raises(OffbatchError, match="allow it with --hgca"):
        make_plan(llama(), torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False, attention="hgca")
    mistral = spec_from_config(synth_config("mistral-7b")) if "mistral-7b" in _presets() else None
    if mistral is not None and mistral.sliding_window:
        with pytest.raises(OffbatchError, match="sliding window"):
            make_plan(mistral, torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False,
                      hgca=HGCASetting())


def _presets():
    from offbatch.models.presets import PRESETS

    return PRESETS


def test_plan_files_keep_the_kv_format_and_hgca_setting(tmp_path):
    wl = Workload.uniform(64, 1024, 64)
    p = make_plan(llama(), torch.bfloat16, "cuda", 8 << 30, wl, hardware="h200", disk_tier=False,
                  kv_formats=["int8"], hgca=HGCASetting(window=128, top_k=32), attention="hgca")
    back = Plan.from_dict(json.loads(json.dumps(p.to_dict())))
    assert (back.attention, back.kv_format, back.hgca) == ("hgca", "int8", "sinks=4,window=128,top_k=32")
    assert "int8 KV" in p.summary() and "window=128" in p.summary()
    from offbatch.errors import PlanFileError

    bad = dict(p.to_dict(), hgca="window=x")
    with pytest.raises(PlanFileError, match="hgca"):
        Plan.from_dict(bad)
    with pytest.raises(PlanFileError, match="names its setting"):
        Plan.from_dict(dict(p.to_dict(), hgca=""))


# ---- the commands ------------------------------------------------------------------------------------
def test_plan_and_bench_take_kv_and_hgca(tmp_path):
    from typer.testing import CliRunner

    from offbatch.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["plan", "--synth", "llama-3-8b", "--hardware", "h200", "--gpu-memory", "8GiB",
                            "--prompt-len", "2048", "--gen-len", "64", "--num-prompts", "256", "--kv", "bf16,int4",
                            "--hgca", "top_k=64", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["plan"]["kv_format"] == "int4"  # fewer bytes on a KV-bound job, and allowed
    assert report["dense"]["decode_tok_s"] < report["predicted"]["decode_tok_s"]  # against the exact job
    if report["plan"]["attention"] == "hgca":
        assert HGCASetting.parse(report["plan"]["hgca"]).top_k == 64
    table = runner.invoke(app, ["plan", "--synth", "llama-3-8b", "--hardware", "h200", "--gpu-memory", "8GiB",
                                "--prompt-len", "2048", "--num-prompts", "256", "--kv", "int8"])
    assert table.exit_code == 0 and "int8" in table.output and "KV bytes over the link" in table.output
    for args, word in ((["--kv", "int3"], "int3"), (["--kv", ","], "KV format"), (["--hgca", "top_k=-1"], "top_k"),
                       (["--hgca", "depth=3"], "depth")):
        bad = runner.invoke(app, ["plan", "--synth", "llama-3-8b", "--hardware", "h200", *args])
        assert bad.exit_code == 2 and word in bad.output, bad.output
    # bench on the CPU: a tiny synth job with int4 KV runs its plan and says so.
    out = tmp_path / "bench.json"
    b = runner.invoke(app, ["bench", "--synth", "llama", "--device", "cpu", "--prompts", "3", "--prompt-len", "5",
                            "--gen-len", "3", "--kv", "int4", "--out", str(out)])
    assert b.exit_code == 0, b.output
    assert "int4 KV" in b.output and json.loads(out.read_text())["plan"]["kv_format"] == "int4"
