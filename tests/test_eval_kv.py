"""`eval-ppl --kv/--hgca`: the decode view of compressed KV and HGCA sparse attention in the reference forward
(attention/lossy_reference.py), the HGCA setting's parsing, the variants eval-ppl scores, and the CLI."""

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from jobs_support import synth_llama
from offbatch.attention.hgca_setting import HGCASetting
from offbatch.attention.lossy_reference import LossyCacheAttention, hgca_attention, stored_view
from offbatch.cli.main import app
from offbatch.engine.reference import ReferenceModel
from offbatch.offload.kv import kv_format
from offbatch.tools.quality import Variant, agreement_of, score, variants, windows

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
WORDS = ["The quick brown fox jumps over the lazy dog.", "Offline batches stream weights over PCIe.",
         "A model reads 42 tokens, then 7 more!", "Perplexity is the exponential of the mean log-loss."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synth_llama(tmp_path_factory.mktemp("evalkv") / "m")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(WORDS[(i * 3) % 4] for i in range(30)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ref(folder):
    return ReferenceModel.load(folder, dtype="float32")


def lossy(ref, kv="dense", hgca=None) -> ReferenceModel:
    """The same modules with LossyCacheAttention."""
    attention = LossyCacheAttention(ref.spec, kv, hgca)
    return ReferenceModel(ref.spec, ref.modules, ref.device, ref.dtype, attention=attention)


def random_ids(ref, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, ref.spec.vocab_size, (n,), generator=g).tolist()


def all_logits(model, ids) -> torch.Tensor:
    return model.forward([model.new_cache(len(ids))], [ids], all_logits=True)


def token_by_token(model, ids) -> torch.Tensor:
    """Logits of every position, one decode step each (a prefill of the first token, then one token a call)."""
    cache = model.new_cache(len(ids))
    return torch.cat([model.forward([cache], [[t]]) for t in ids])


# ---- the HGCA setting ------------------------------------------------------------------------------

def test_hgca_setting_parses_and_spells_itself():
    assert HGCASetting.parse("window=256,top_k=128") == HGCASetting(4, 256, 128)
    assert HGCASetting.parse(" top-k = 7 , sinks=0,window=3 ") == HGCASetting(sinks=0, window=3, top_k=7)
    assert HGCASetting.parse("") == HGCASetting.parse("default") == HGCASetting()
    s = HGCASetting(sinks=2, window=33, top_k=5)
    assert HGCASetting.parse(str(s)) == s
    assert s.words() == "HGCA sinks 2, window 33, top-k 5" and s.as_dict() == {"sinks": 2, "window": 33, "top_k": 5}
    assert s.split(1) == (1, 1) and s.split(20) == (2, 2) and s.split(100) == (2, 67)  # (sink_end, recent_start)
    assert s.exact_up_to() == 40


@pytest.mark.parametrize("text, words", [("window=abc", "not a whole number"), ("foo=3", "unknown name 'foo'"),
                                         ("window=1,window=2", "given twice"), ("window=0", "at least 1"),
                                         ("top_k=-1", "at least 0"), ("window", "not NAME=NUMBER"),
                                         ("window=8,", "not NAME=NUMBER"), ("=4", "not NAME=NUMBER"),
                                         ("window=2.5", "not a whole number")])
def test_hgca_setting_parse_errors(text, words):
    with pytest.raises(ValueError, match=words):
        HGCASetting.parse(text)


def test_hgca_refuses_a_sliding_window_model(ref):
    sliding = dataclasses.replace(ref.spec, sliding_window=16)
    with pytest.raises(ValueError, match="sliding-window"):
        LossyCacheAttention(sliding, "int8", HGCASetting())
    LossyCacheAttention(sliding, "int8")  # a KV format alone is fine


# ---- the simulated attention against a direct computation -----------------------------------------

def direct_hgca(q, k, v, q_start, setting):
    """Float64, one query and head at a time, the keep set built by hand from the definition."""
    t, nh, d = q.shape
    L, nkv, _ = k.shape
    rep = nh // nkv
    out = torch.zeros(t, nh, d, dtype=torch.float64)
    for i in range(t):
        pos = q_start + i
        for h in range(nh):
            kh, vh = k[:, h // rep].double(), v[:, h // rep].double()
            s = (kh[: pos + 1] @ q[i, h].double()) / math.sqrt(d)
            keep = {j for j in range(pos + 1) if j < setting.sinks or j >= pos + 1 - setting.window}
            older = sorted((j for j in range(pos + 1) if j not in keep), key=lambda j: -s[j].item())
            keep |= set(older[: setting.top_k])
            idx = torch.tensor(sorted(keep))
            p = torch.softmax(s[idx], dim=0)
            out[i, h] = p @ vh[idx]
    return out


@pytest.mark.parametrize("nh, nkv, t, L, setting", [
    (1, 1, 11, 11, HGCASetting(sinks=1, window=2, top_k=3)),   # the 1-head toy
    (1, 1, 5, 13, HGCASetting(sinks=0, window=3, top_k=2)),    # a chunk of queries after cached keys
    (4, 2, 9, 17, HGCASetting(sinks=2, window=4, top_k=1)),    # GQA, ragged sizes
    (3, 1, 7, 7, HGCASetting(sinks=3, window=1, top_k=0)),     # no older keys at all: sinks + itself
])
def test_hgca_attention_equals_a_direct_computation(nh, nkv, t, L, setting):
    g = torch.Generator().manual_seed(nh * 100 + L)
    d = 8
    q, k, v = (torch.randn(n, h, d, generator=g) for n, h in ((t, nh), (L, nkv), (L, nkv)))
    want = direct_hgca(q, k, v, L - t, setting)
    got = hgca_attention(q, k, v, L - t, setting)
    assert got.dtype == q.dtype and got.shape == (t, nh, d)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Chunked queries (a tiny score budget: one a chunk; 4 a chunk): the same result.
    torch.testing.assert_close(hgca_attention(q, k, v, L - t, setting, score_bytes=1), got, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hgca_attention(q, k, v, L - t, setting, chunk=4), got, atol=1e-6, rtol=1e-6)


def test_hgca_keeps_the_highest_scoring_older_key():
    """Hand-made: 1 head, d 1, keys 0..5; the query at 5 sees sink 0 and recent 4..5 exactly, and of the
    older keys 1..3 only the highest scoring one (key 2)."""
    q = torch.tensor([[[1.0]]])
    k = torch.tensor([0.0, 1.0, 3.0, 2.0, 0.5, 0.0]).reshape(6, 1, 1)
    v = torch.tensor([1.0, 10.0, 100.0, 1000.0, 1e4, 1e5]).reshape(6, 1, 1)
    out = hgca_attention(q, k, v, 5, HGCASetting(sinks=1, window=2, top_k=1))
    kept = torch.tensor([0, 2, 4, 5])
    p = torch.softmax(k.flatten()[kept], dim=0)
    assert out.item() == pytest.approx((p * v.flatten()[kept]).sum().item(), rel=1e-6)


# ---- the reference forward with lossy attention -------------------------------------------------------

def test_dense_kv_without_hgca_is_the_exact_path(ref):
    ids = random_ids(ref, 37, seed=1)
    exact = all_logits(ref, ids)
    for name in ("dense", "bf16"):
        assert torch.equal(all_logits(lossy(ref, name), ids), exact)


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_each_key_and_value_is_quantized_once_when_written(ref, kv):
    """Attend a prompt of 6 tokens, then 2 decode steps of 1: the cache holds each row's decode(encode(row))
    and every step attends over exactly those (its own included), never re-quantized."""
    from offbatch.engine.reference import KVCache
    from offbatch.models import layers as L

    spec, d = ref.spec, ref.spec.head_dim
    fmt = kv_format(kv, torch.float32)
    attention = LossyCacheAttention(spec, kv)
    cache = KVCache(spec, "cpu", torch.float32, capacity=2)
    g = torch.Generator().manual_seed(5)
    written_k, written_v = [], []
    for n in (6, 1, 1):
        q = torch.randn(n, spec.num_heads, d, generator=g)
        k, v = (torch.randn(n, spec.num_kv_heads, d, generator=g) * 3 for _ in "kv")
        written_k.append(stored_view(fmt, k))
        written_v.append(stored_view(fmt, v))
        out = attention.attend(1, q, k, v, ([cache], [n]))
        kk, vv = torch.cat(written_k), torch.cat(written_v)
        assert torch.equal(cache.k[1, : len(kk)], kk) and torch.equal(cache.v[1, : len(vv)], vv)
        assert not torch.equal(kk[-n:], k)  # lossy
        assert torch.equal(out, L.causal_attention(q, kk, vv, cache.length))
        cache.advance(n)


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantized_kv_teacher_forced_is_what_decode_steps_see(ref, kv):
    ids = random_ids(ref, 23, seed=2)
    model = lossy(ref, kv)
    teacher_forced = all_logits(model, ids)
    lost = (teacher_forced - all_logits(ref, ids)).abs().amax()
    # One token a step: the same logits, but for float rounding between the two forwards, which can move a
    # value across a code boundary now and then (one quantum): far below what quantization itself loses.
    assert lost > 1e-3
    assert (token_by_token(model, ids) - teacher_forced).abs().amax() < 0.1 * lost


def test_quantized_kv_quality_is_finite_and_int4_loses_more(ref, folder, text):
    from offbatch.models.tokenizer import load_tokenizer

    wins = windows(load_tokenizer(folder).encode(text.read_text(), add_special_tokens=False), 48, max_windows=4)
    base = score(ref, wins)
    s8, s4 = score(lossy(ref, "int8"), wins), score(lossy(ref, "int4"), wins)
    assert all(math.isfinite(s.perplexity) for s in (base, s8, s4))
    a8, a4 = agreement_of(base, s8), agreement_of(base, s4)
    assert 0.9 <= a8 <= 1.0 and 0.5 <= a4 < 1.0 and a4 <= a8
    ids = list(wins[0].ids)
    exact = all_logits(ref, ids)
    err8, err4 = ((all_logits(lossy(ref, kv), ids) - exact).abs().mean() for kv in ("int8", "int4"))
    assert 0 < err8 < err4 / 4  # 4 bits lose far more than 8


@pytest.mark.parametrize("setting", [HGCASetting(sinks=4, window=64, top_k=0),    # window covers all
                                     HGCASetting(sinks=0, window=1, top_k=64),    # top_k covers all
                                     HGCASetting(sinks=40, window=1, top_k=0)])   # sinks cover all
def test_hgca_covering_the_text_equals_the_exact_path(ref, setting):
    ids = random_ids(ref, 40, seed=3)
    torch.testing.assert_close(all_logits(lossy(ref, hgca=setting), ids), all_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_small_hgca_differs_and_is_what_decode_steps_see(ref):
    ids = random_ids(ref, 41, seed=4)
    model = lossy(ref, "int8", HGCASetting(sinks=2, window=5, top_k=3))
    got = all_logits(model, ids)
    exact = all_logits(ref, ids)
    # Positions whose query sees every key (at most sinks + window + top_k keys) are exact; later ones differ.
    torch.testing.assert_close(got[:10], all_logits(lossy(ref, "int8"), ids)[:10], atol=1e-4, rtol=1e-4)
    assert (got[12:] - exact[12:]).abs().amax() > 1e-2
    assert (token_by_token(model, ids) - got).abs().amax() < 0.1 * (got - exact).abs().amax()


# ---- what eval-ppl scores ------------------------------------------------------------------------

def test_variants_order_combinations_and_repeats():
    h1, h2 = HGCASetting(window=8), HGCASetting(window=16)
    assert variants("dense") == [Variant("dense")]
    got = variants("dense", ["int8", "dense"], ["int8", "dense", "int4", "int8"], [h1, h2, h1])
    assert got == [Variant("dense"), Variant("dense", "int8"), Variant("dense", "int4"),
                   Variant("dense", hgca=h1), Variant("dense", hgca=h2),
                   Variant("dense", "int8", h1), Variant("dense", "int8", h2),
                   Variant("dense", "int4", h1), Variant("dense", "int4", h2), Variant("int8")]
    assert Variant("dense", "int4", h1).settings() == {"weights": "dense", "kv": "int4",
                                                       "hgca": {"sinks": 4, "window": 8, "top_k": 128},
                                                       "ffn": "dense", "hot_fraction": None, "kv_balance": False}
    # --kv-balance: each compressed format again with balanced keys, right after it (dense KV has none).
    got = variants("dense", [], ["dense", "int4"], [h1], kv_balance=True)
    assert got == [Variant("dense"), Variant("dense", "int4"), Variant("dense", "int4", kv_balance=True),
                   Variant("dense", hgca=h1), Variant("dense", "int4", h1), Variant("dense", "int4", h1, kv_balance=True)]
    # The hybrid FFN's hot shares come after the KV and attention variants, before other weight formats.
    got = variants("dense", ["int8"], ["int4"], [], [0.2, 0.0, 0.2])
    assert got == [Variant("dense"), Variant("dense", "int4"), Variant("dense", hot_fraction=0.2),
                   Variant("dense", hot_fraction=0.0), Variant("int8")]
    assert Variant("dense", hot_fraction=0.2).settings()["ffn"] == "hybrid"


def invoke(*args):
    return runner.invoke(app, ["eval-ppl", *map(str, args)])


def test_cli_reports_every_variant_with_its_settings(folder, text):
    r = invoke(folder, text, "--window", 48, "--max-windows", 3, "--device", "cpu", "--json",
               "--kv", "int8", "--kv", "int4", "--hgca", "window=6,top_k=4,sinks=2")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    rows = report["results"]
    assert [(x["weights"], x["kv"], x["hgca"] and x["hgca"]["window"]) for x in rows] == [
        ("dense", "dense", None), ("dense", "int8", None), ("dense", "int4", None), ("dense", "dense", 6),
        ("dense", "int8", 6), ("dense", "int4", 6)]
    base = rows[0]
    assert "agreement" not in base and "delta_pct" not in base
    assert rows[3]["hgca"] == {"sinks": 2, "window": 6, "top_k": 4}
    for x in rows[1:]:
        assert x["tokens"] == base["tokens"] == report["scored_tokens"]
        assert math.isfinite(x["perplexity"]) and 0.0 < x["agreement"] <= 1.0
        assert x["delta_pct"] == pytest.approx(100 * (x["perplexity"] / base["perplexity"] - 1))
    assert rows[3]["agreement"] < 1.0  # 48-token windows, 12 keys seen exactly or chosen: not the exact path


def test_cli_table_names_the_kv_and_attention(folder, text):
    r = invoke(folder, text, "--window", 32, "--max-windows", 2, "--kv", "int4", "--hgca", "window=4,top_k=2")
    assert r.exit_code == 0, r.output
    for words in ("KV", "int4", "HGCA s4", "vs base", "prefill stays exact"):
        assert words in r.stdout, r.stdout


def test_cli_errors(folder, text, tmp_path):
    def fails(code, words, *args):
        r = invoke(*args)
        assert r.exit_code == code, r.output
        assert words in " ".join(r.output.replace("│", " ").split()), r.output  # (rich wraps the message in a box)

    fails(2, "not a KV format", folder, text, "--kv", "int9")
    fails(2, "given twice", folder, text, "--hgca", "window=4,window=8")
    fails(2, "unknown name 'topp'", folder, text, "--hgca", "topp=4")
    sliding = synth_llama(tmp_path / "s")
    cfg = json.loads((sliding / "config.json").read_text())
    (sliding / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    fails(3, "not applicable to a sliding-window model", sliding, text, "--hgca", "window=4")
