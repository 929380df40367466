"""Balanced keys for compressed KV (offbatch/attention/key_balance.py, `--kv-balance`, `calibrate-keys`): the scales
leave q.k unchanged, round-trip through their file and refuse another model's; the engine with a compressed KV
format and balanced keys gives the tokens of a reference forward with the same semantics (keys divided, queries
multiplied, K stored quantized once); with exact KV the engine ignores them (the exact path stays exact); the
commands write, measure, key and refuse as they say."""

import json

import pytest
import torch
from typer.testing import CliRunner

from hf_factory import save_hf_model
from jobs_support import synth_llama
from offbatch.attention.key_balance import (KEY_SCALES_FILE, KeyScales, calibrate, key_scales_for_folder,
                                            load_key_scales, scales_from_maxima)
from offbatch.cli.main import app
from offbatch.engine.reference import ReferenceModel
from offbatch.errors import InputFileError
from test_engine_kv import NEW, PROMPTS, StoredKVAttention, engine_tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny GQA Llama with its keys calibrated on a few random windows."""
    path = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", path)
    ref = ReferenceModel.load(path, dtype="float32")
    g = torch.Generator().manual_seed(1)
    wins = [torch.randint(0, ref.spec.vocab_size, (24,), generator=g).tolist() for _ in range(3)]
    calibrate(ref, wins).save(path / KEY_SCALES_FILE)
    return path


def random_scales(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KeyScales({i: torch.rand(spec.num_kv_heads, spec.head_dim, generator=g) * 4 + 0.1
                      for i in range(spec.num_layers)})


def test_balancing_leaves_every_score_unchanged(folder):
    spec = ReferenceModel.load(folder, dtype="float32").spec
    scales = random_scales(spec)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, spec.num_heads, spec.head_dim, generator=g)
    k = torch.randn(7, spec.num_kv_heads, spec.head_dim, generator=g)
    qb, kb = scales.apply(1, q, k)
    assert not torch.allclose(kb, k)
    rep = spec.num_heads // spec.num_kv_heads
    assert rep > 1  # GQA: query heads share their KV head's scales
    for h in range(spec.num_heads):
        torch.testing.assert_close(qb[:, h] @ kb[:, h // rep].T, q[:, h] @ k[:, h // rep].T, rtol=1e-5, atol=1e-5)


def test_scales_are_balanced_per_head_and_rope_pairs_share_one():
    m = torch.tensor([[1.0, 4.0, 16.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    s = scales_from_maxima({0: m}, 4, rope_pairs=True)[0]
    assert torch.equal(s[0, :2], s[0, 2:])  # channel c rotates with c + d/2
    torch.testing.assert_close(s.log().mean(-1), torch.zeros(2), atol=1e-6, rtol=0)  # product 1 per head
    torch.testing.assert_close(s[1], torch.ones(4))  # even keys: nothing to balance
    free = scales_from_maxima({0: m}, 4, rope_pairs=False)[0]
    assert free[0].argmax() == 2


def test_scales_round_trip_and_refuse_another_model(folder, tmp_path):
    spec = ReferenceModel.load(folder, dtype="float32").spec
    s = load_key_scales(folder / KEY_SCALES_FILE)
    assert s.meta["windows"] == 3 and sorted(s.scales) == list(range(spec.num_layers))
    s.check(spec)
    again = tmp_path / "k.safetensors"
    s.save(again)
    assert all(torch.equal(load_key_scales(again).scales[i], t) for i, t in s.scales.items())
    wrong = KeyScales({i: torch.ones(spec.num_kv_heads + 1, spec.head_dim) for i in range(spec.num_layers)})
    with pytest.raises(InputFileError, match="another model"):
        wrong.check(spec)
    with pytest.raises(InputFileError, match="lack layer"):
        KeyScales({0: torch.ones(spec.num_kv_heads, spec.head_dim)}).check(spec)
    bad = KeyScales({i: torch.zeros(spec.num_kv_heads, spec.head_dim) for i in range(spec.num_layers)})
    with pytest.raises(InputFileError, match="zero"):
        bad.check(spec)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputFileError, match="not key scales"):
        load_key_scales(tmp_path / "junk.safetensors")
    with pytest.raises(InputFileError, match="calibrate-keys"):
        key_scales_for_folder(tmp_path)


class BalancedStoredKV(StoredKVAttention):
    """The engine's semantics with balanced keys: q times the scales, k divided, then K/V stored quantized once
    (test_engine_kv's oracle)."""

    def __init__(self, spec, name, scales):
        super().__init__(spec, name)
        self.scales = scales

    def attend(self, layer, q, k, v, step):
        q, k = self.scales.apply(layer, q, k)
        return super().attend(layer, q, k, v, step)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_engine_with_balanced_keys_equals_its_oracle(folder, kv, device):
    ref = ReferenceModel.load(folder, dtype="float32")
    scales = random_scales(ref.spec, seed=5)  # far from even: the balanced path is visibly another computation
    oracle = ReferenceModel(ref.spec, ref.modules, "cpu", torch.float32, BalancedStoredKV(ref.spec, kv, scales))
    eng, got = engine_tokens(folder, device, kv_formats=[kv], key_scales=scales, attn_micro_batch=2, max_wave=3)
    assert eng.plan.kv_format == kv and eng.forward.key_scales is scales
    assert got == oracle.greedy(PROMPTS, NEW)


def test_exact_kv_ignores_the_scales(folder):
    exact = ReferenceModel.load(folder, dtype="float32").greedy(PROMPTS, NEW)
    scales = random_scales(ReferenceModel.load(folder, dtype="float32").spec, seed=5)
    eng, got = engine_tokens(folder, key_scales=scales)
    assert eng.plan.kv_format == "dense" and eng.forward.key_scales is None and got == exact


def test_commands(tmp_path):
    """calibrate-keys writes the scales and prints both qualities; run --kv int4 --kv-balance keys its results
    apart; eval-ppl scores the balanced variant; every misuse is one clear error, nothing written."""
    model = synth_llama(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 53} and{i % 7} more{i % 11}." for i in range(900)))
    runner = CliRunner()
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t, "max_tokens": 5}) + "\n"
                               for i, t in enumerate(["hello there", "a b c d e f g", "the end"])))
    out = tmp_path / "out.jsonl"
    r = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(out), "--kv", "int4", "--kv-balance"])
    assert r.exit_code != 0 and "calibrate-keys" in r.output and not out.exists()
    r = runner.invoke(app, ["calibrate-keys", str(model), str(text), "--window", "64", "--windows", "2",
                            "--eval-text", str(text), "--eval-windows", "1"])
    assert r.exit_code == 0, r.output
    assert (model / KEY_SCALES_FILE).is_file() and "with balanced keys" in r.output and "int4 KV" in r.output
    q = load_key_scales(model / KEY_SCALES_FILE).meta["quality"]
    assert q["kv"] == "int4" and q["plain"]["perplexity"] > 0 and q["balanced"]["perplexity"] > 0
    again = runner.invoke(app, ["calibrate-keys", str(model), str(text), "--window", "64", "--no-eval"])
    assert again.exit_code != 0 and "--overwrite" in again.output
    r = runner.invoke(app, ["calibrate-keys", str(model), str(text), "--kv", "dense", "--overwrite"])
    assert r.exit_code != 0 and "exact" in r.output
    r = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(out), "--kv", "int4", "--kv-balance", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(x.get("error") is None for x in rows)
    plain = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(out), "--kv", "int4", "--quiet"])
    assert plain.exit_code != 0 and "changed" in plain.output.lower()  # balanced results are other results
    r = runner.invoke(app, ["run", str(model), str(prompts), "-o", str(tmp_path / "x.jsonl"), "--kv-balance"])
    assert r.exit_code != 0 and "--kv int8 or int4" in r.output and not (tmp_path / "x.jsonl").exists()
    r = runner.invoke(app, ["eval-ppl", str(model), str(text), "--window", "64", "--max-windows", "1", "--kv", "int4",
                            "--kv-balance", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["results"]
    assert [(x["kv"], x["kv_balance"]) for x in rows] == [("dense", False), ("int4", False), ("int4", True)]
    assert rows[2]["perplexity"] != rows[1]["perplexity"]
    r = runner.invoke(app, ["eval-ppl", str(model), str(text), "--kv-balance"])
    assert r.exit_code != 0 and "--kv int8 or int4" in r.output
