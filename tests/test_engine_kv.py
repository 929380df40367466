"""The streaming engine with compressed KV and with HGCA, end to end on tiny models (CPU compute device):
greedy tokens equal an oracle reference forward with the same semantics (prompts attend their own
K/V exactly; every key and value is stored quantized once; a decode step attends the stored ones,
its own included), HGCA with top-k over every older key gives the exact engine's tokens, and `run
--kv / --hgca` on the CPU writes its results under their own key."""

import json

import pytest
import torch

from hf_factory import save_hf_model
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.engine.reference import KVCache, ReferenceModel
from offbatch.models import layers as L
from offbatch.offload.kv import kv_format

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3, 4, 5, 6], [99], list(range(1, 15)), [7, 7, 7]]
NEW = 10

pytestmark = pytest.mark.usefixtures("one_thread")


class StoredKVAttention:
    """The reference forward's attention with the engine's compressed-KV semantics."""

    def __init__(self, spec, name):
        self.spec, self.fmt = spec, kv_format(name, torch.float32)

    def attend(self, layer, q, k, v, step):
        caches, lens = step
        outs, start = [], 0
        for cache, n in zip(caches, lens):
            kn, vn = k[start : start + n], v[start : start + n]
            d = kn.shape[-1]
            kq, vq = self.fmt.decode(self.fmt.encode(kn), d), self.fmt.decode(self.fmt.encode(vn), d)
            kk, vv = cache.extend(layer, kq, vq)
            if cache.length == 0:  # a prompt: its own K/V as computed
                outs.append(L.causal_attention(q[start : start + n], kn, vn, 0, self.spec.sliding_window))
            else:
                outs.append(L.causal_attention(q[start : start + n], kk, vv, cache.length, self.spec.sliding_window))
            start += n
        return torch.cat(outs)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    return path


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def engine_tokens(path, device="cpu", **options):
    eng = engine_for_folder(path, device=device, dtype="float32", num_requests=len(PROMPTS), max_len=32, **options)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    eng.close()
    return eng, [outs[i] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_engine_with_compressed_kv_equals_the_stored_kv_oracle(folder, kv, device):
    ref = ReferenceModel.load(folder, dtype="float32")
    oracle = ReferenceModel(ref.spec, ref.modules, "cpu", torch.float32, StoredKVAttention(ref.spec, kv))
    expected = oracle.greedy(PROMPTS, NEW)
    eng, got = engine_tokens(folder, device, kv_formats=[kv], attn_micro_batch=2, prefill_tokens=16, max_wave=3)
    assert eng.plan.kv_format == kv and eng.attention.kv.packed
    assert got == expected
    # The oracle is not the exact forward in disguise: its decode logits move.
    logits = []
    for model in (ref, oracle):
        cache = model.new_cache(20)
        model.forward([cache], [PROMPTS[1]])
        logits.append(model.forward([cache], [[5]]))
    assert not torch.allclose(logits[0], logits[1], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv", ["dense", "int8", "int4"])
@pytest.mark.parametrize("gpu_writes", ["1", "0"])
def test_host_kv_gpu_stores_decode_tokens_from_the_gpu(folder, kv, gpu_writes, monkeypatch):
    """Host KV with GPU attention: the step's new K/V rows are written into the pinned host KV by the GPU (no
    host writer thread for them) and the next steps read them back: the same tokens as the oracle, and as the
    writer's path (OFFBATCH_KV_GPU_WRITES=0)."""
    monkeypatch.setenv("OFFBATCH_KV_GPU_WRITES", gpu_writes)
    ref = ReferenceModel.load(folder, dtype="float32")
    if kv == "dense":
        expected = ref.greedy(PROMPTS, NEW)
    else:
        expected = ReferenceModel(ref.spec, ref.modules, "cpu", torch.float32, StoredKVAttention(ref.spec, kv)).greedy(
            PROMPTS, NEW)
    eng, got = engine_tokens(folder, "cuda", kv_formats=[kv], attention="host-kv-gpu", attn_micro_batch=2,
                             prefill_tokens=16, max_wave=3)
    assert eng.plan.attention == "host-kv-gpu" and eng.attention.kv.pinned
    assert got == expected
    # The writer thread stored the prompts only, or every row with OFFBATCH_KV_GPU_WRITES=0.
    prompt_rows = sum(len(p) for p in PROMPTS) * eng.spec.num_layers
    decode_rows = len(PROMPTS) * (NEW - 1) * eng.spec.num_layers
    assert eng.attention.kv.writer.rows_written == prompt_rows + (decode_rows if gpu_writes == "0" else 0)


@pytest.mark.parametrize("device", DEVICES)
def test_hgca_over_every_older_key_gives_the_exact_tokens(folder, device):
    from offbatch.attention.hgca_setting import HGCASetting

    exact = ReferenceModel.load(folder, dtype="float32").greedy(PROMPTS, NEW)
    eng, got = engine_tokens(folder, device, attention="hgca", hgca=HGCASetting(sinks=1, window=3, top_k=100))
    assert eng.plan.attention == "hgca" and eng.attention.cpu_s > 0  # the CPU half ran
    assert got == exact


def test_run_with_kv_and_hgca_on_the_cpu_writes_results_under_their_own_key(tmp_path):
    from typer.testing import CliRunner

    from jobs_support import synth_llama
    from offbatch.cli.main import app

    folder = synth_llama(tmp_path / "model")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t, "max_tokens": 6}) + "\n"
                               for i, t in enumerate(["hello there", "a b c d e f g", "the end"])))
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(folder), str(prompts), "-o", str(out), "--kv", "int4", "--quiet"])
    assert first.exit_code == 0, first.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r.get("error") is None for r in rows)
    # The same job exact, into the same file: other results (a changed key), not a silent reuse.
    again = runner.invoke(app, ["run", str(folder), str(prompts), "-o", str(out), "--quiet"])
    assert again.exit_code != 0 and "changed" in again.output.lower()
    bad = runner.invoke(app, ["run", str(folder), str(prompts), "-o", str(tmp_path / "b.jsonl"), "--kv", "int3"])
    assert bad.exit_code == 2 and "int3" in bad.output
    bad = runner.invoke(app, ["run", str(folder), str(prompts), "-o", str(tmp_path / "c.jsonl"), "--hgca", "window=x"])
    assert bad.exit_code == 2 and "window" in bad.output
    hg = runner.invoke(app, ["run", str(folder), str(prompts), "-o", str(tmp_path / "h.jsonl"), "--hgca",
                             "window=2,top_k=1,sinks=1", "--quiet"])
    assert hg.exit_code == 0, hg.output
    assert len((tmp_path / "h.jsonl").read_text().splitlines()) == 3
