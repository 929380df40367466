"""A split weight stream (engine/split.py, offload/shard_group.py): rank processes on the CPU (gloo, as CI
can run them) each copy their chunk of every streamed module and gather the rest; their greedy tokens
equal the reference forward's, request for request, with ranks that finish at different steps (idle
steps), MoE layers whose ranks route to different experts (passed over / agreed unused), and a plan
that streams every module through small slot rings."""

import dataclasses
import random

import pytest
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.build import engine_for_folder
from offbatch.engine.reference import ReferenceModel
from offbatch.engine.split import SplitStreamGenerator
from offbatch.errors import OffbatchError
from offbatch.offload.shard_group import ShardGroup


def synth(folder, family):
    r = CliRunner().invoke(app, ["synth", family, str(folder), "--seed", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    return folder


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def model(request, tmp_path_factory):
    return synth(tmp_path_factory.mktemp(request.param) / "model", request.param)


def job(vocab: int, n: int, seed: int = 0):
    """n prompts of ragged lengths, each with its own number of new tokens (so ranks finish apart)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 12))] for _ in range(n)]
    new = [rng.randrange(1, 9) for _ in range(n)]
    return prompts, new


def streamed_plan(model, n: int, **pins):
    """The planner's plan for the job with every module but the embedding and the routers streamed through
    rings of 2 (the routers stay resident, as every plan keeps them)."""
    plan = engine_for_folder(model, device="cpu", dtype="float32", num_requests=n, max_len=24, prefill_tokens=16,
                             attn_micro_batch=2, ffn_micro_tokens=8, plan_only=True, **pins)
    spec = ReferenceModel.load(model, dtype="float32").spec
    routers = {(layer, "router") for layer in range(spec.num_layers)} if spec.moe else set()
    slots = {"attn": 2, "ffn": 2, "expert": 2, "shared": 2, "head": 1}
    return dataclasses.replace(plan, resident=routers, slots=slots)


def test_ranks_split_the_stream_and_give_the_reference_tokens(model):
    ref = ReferenceModel.load(model, dtype="float32")
    prompts, new = job(ref.spec.vocab_size, 7)
    expected = ref.greedy(prompts, max(new))
    plan = streamed_plan(model, len(prompts))
    gen = SplitStreamGenerator(model, plan, world=2, device="cpu", build={"dtype": "float32"}, threads=1)
    try:
        reqs = [GenRequest(i, p, SamplingParams(max_tokens=m, ignore_eos=True)) for i, (p, m) in enumerate(zip(prompts, new))]
        outs = {o.key: o for o in gen.generate(reqs)}
        assert sorted(outs) == list(range(len(prompts)))
        for i, m in enumerate(new):
            assert outs[i].token_ids == expected[i][:m], f"request {i}"
            assert outs[i].finish_reason == "length"
        # Each rank holds its half of the weights in host memory (the embedding whole), not the model.
        for s in gen.rank_startup:
            assert 0.4 * s["model_bytes"] < s["host_weight_bytes"] < 0.75 * s["model_bytes"]
        # Ranks got 4 and 3 requests of different lengths: one ran steps with nothing of its own.
        assert sum(s["idle_steps"] for s in gen.rank_stats) > 0
        assert gen.stats.generated_tokens == sum(new)
        # A second job on the same ranks (a run's next batch of requests).
        again = {o.key: o.token_ids for o in gen.generate(reqs[:3])}
        assert again == {i: expected[i][: new[i]] for i in range(3)}
    finally:
        gen.close()
    assert all(p.exitcode == 0 for p in gen.procs)


def test_a_rank_with_no_request_streams_for_the_other(model):
    ref = ReferenceModel.load(model, dtype="float32")
    prompts, new = job(ref.spec.vocab_size, 1, seed=3)
    gen = SplitStreamGenerator(model, streamed_plan(model, 1), world=2, device="cpu", build={"dtype": "float32"},
                               threads=1)
    try:
        (out,) = list(gen.generate([GenRequest(7, prompts[0], SamplingParams(max_tokens=new[0], ignore_eos=True))]))
    finally:
        gen.close()
    assert out.key == 7 and out.token_ids == ref.greedy(prompts, new[0])[0]


def test_a_failing_rank_is_one_clear_error_and_the_ranks_end(model, monkeypatch):
    plan = streamed_plan(model, 2)
    bad = dataclasses.replace(plan, max_len=10 ** 9)  # the rank's check refuses it (more than the model's context)
    with pytest.raises(OffbatchError, match="rank 0 failed|rank 1 failed"):
        SplitStreamGenerator(model, bad, world=2, device="cpu", build={"dtype": "float32"}, threads=1)


def test_split_stream_refuses_what_it_cannot_run(model):
    plan = streamed_plan(model, 2)
    with pytest.raises(OffbatchError, match="at least 2"):
        SplitStreamGenerator(model, plan, world=1, device="cpu")
    with pytest.raises(OffbatchError, match="disk tier"):
        SplitStreamGenerator(model, dataclasses.replace(plan, disk={(0, "attn")}), world=2, device="cpu")


def test_chunks_cover_every_byte_once():
    for world in (2, 3, 4):
        for n in (1, 511, 512, 513, 4096 * 3 + 7, 10 ** 6 + 1):
            ranges = [ShardGroup(r, world, "cpu").own_range(n) for r in range(world)]
            covered = [b for lo, hi in ranges for b in range(lo, hi)] if n < 20000 else None
            if covered is not None:
                assert covered == list(range(n))
            assert sum(max(0, hi - lo) for lo, hi in ranges) == n
            g = ShardGroup(0, world, "cpu")
            assert g.padded(n) >= n and g.padded(n) % (world * 512) == 0


# ---- `offbatch run --split-stream` -------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def records(path):
    from jobs_support import read_jsonl

    recs = read_jsonl(path)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "a request has two records"
    return dict(zip(ids, recs))


def test_run_split_stream_equals_the_plain_run_record_for_record(tmp_path):
    """Through the jobs layer: every request field a line can carry (n, sampling with a seed, stop strings,
    logprobs, chat), a bad line as an error record, the MoE model streamed under a cap; then a rerun
    resumes with nothing to do."""
    from jobs_support import WORDS, write_jsonl

    folder = synth(tmp_path / "mixtral", "mixtral")
    rows = [{"id": f"m{i}", "prompt": " ".join(WORDS[2 * i:2 * i + 2 + i % 5]), "max_tokens": 3 + i % 6}
            for i in range(9)]
    rows += ["{not json",
             {"id": "two", "prompt": "tell me about the sun", "n": 2, "temperature": 0.9, "seed": 11, "logprobs": 2},
             {"id": "stop", "prompt": "one two three", "stop": ["e"], "max_tokens": 12},
             {"id": "chat", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    engine = ["--engine", "streaming", "--device", "cpu", "--gpu-memory", "2MiB", "--max-tokens", "8"]
    plain, split = tmp_path / "plain.jsonl", tmp_path / "split.jsonl"
    assert cli("run", folder, prompts, "-o", plain, *engine).exit_code == 1  # the bad line
    r = cli("run", folder, prompts, "-o", split, *engine, "--split-stream", 2, "--log-format", "json")
    assert r.exit_code == 1, r.output
    want, got = records(plain), records(split)
    assert got.keys() == want.keys()
    assert got[10]["error"]["code"] == "invalid_request"  # the bad line, by its line number
    for key, rec in want.items():
        assert got[key].get("error") == rec.get("error"), key
        if rec.get("error") is None:
            assert got[key]["text"] == rec["text"], key
            assert got[key]["finish_reason"] == rec["finish_reason"], key
    assert "weight stream split over 2 GPUs" in r.stderr
    again = cli("run", folder, prompts, "-o", split, *engine, "--split-stream", 2, "--log-format", "json")
    assert again.exit_code == 1 and records(split).keys() == want.keys()  # resumed: nothing written twice


def test_run_split_stream_refuses_what_it_cannot_run(tmp_path):
    folder = synth(tmp_path / "llama", "llama")
    from jobs_support import write_jsonl

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    out = tmp_path / "o.jsonl"
    r = cli("run", folder, prompts, "-o", out, "--device", "cpu", "--split-stream", 2)
    assert r.exit_code == 3 and "add --engine streaming" in r.output
    r = cli("run", folder, prompts, "-o", out, "--device", "cpu", "--engine", "streaming", "--split-stream", 2,
            "--ffn", "hybrid")
    assert r.exit_code == 3 and "drop --ffn hybrid" in r.output
    r = cli("run", folder, prompts, "-o", out, "--device", "cuda:1", "--split-stream", 2)
    assert r.exit_code == 3  # no GPU here, or a GPU other than the ranks' first
    r = cli("run", folder, prompts, "-o", out, "--split-stream", 0)
    assert r.exit_code == 2
    assert not out.exists()


# ---- on a GPU: the NCCL gathers on their own stream -------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_gpu_group_of_one_gathers_through_nccl_and_gives_the_engines_tokens(family, tmp_path):
    """One GPU can hold only one NCCL rank, so this runs a group of one: every streamed module's copy, its
    all-gather on the gather stream and the events between them, and the MoE experts passed over, against
    the plain engine's tokens under the same plan (the two-GPU run is scripts/bench_scale.py split)."""
    from offbatch.engine.split import _free_port

    model = synth(tmp_path / family, family)
    prompts, new = job(1000, 6, seed=4)
    plan = engine_for_folder(model, device="cuda", dtype="bfloat16", num_requests=6, max_len=24, prefill_tokens=16,
                             attn_micro_batch=2, ffn_micro_tokens=8, plan_only=True)
    spec = ReferenceModel.load(model, dtype="float32").spec
    routers = {(layer, "router") for layer in range(spec.num_layers)} if spec.moe else set()
    plan = dataclasses.replace(plan, resident=routers, slots={"attn": 2, "ffn": 2, "expert": 3, "shared": 2, "head": 1})
    reqs = [GenRequest(i, [t % spec.vocab_size for t in p], SamplingParams(max_tokens=m, ignore_eos=True))
            for i, (p, m) in enumerate(zip(prompts, new))]
    plain = engine_for_folder(model, device="cuda", dtype="bfloat16", plan=plan)
    want = {o.key: o.token_ids for o in plain.generate(reqs)}
    plain.close()
    group = ShardGroup.connect(0, 1, "cuda:0", f"tcp://127.0.0.1:{_free_port()}")
    try:
        eng = engine_for_folder(model, device="cuda", dtype="bfloat16", plan=plan, group=group)
        got = {o.key: o.token_ids for o in eng.generate(reqs)}
        assert eng.pf.stats.copies > 0
        eng.close()
    finally:
        group.close()
    assert got == want


def test_a_rank_killed_mid_job_ends_the_job_with_its_error_and_no_rank_is_left(tmp_path):
    """The ranks step together: when one dies (killed, out of memory) the others cannot go on. The caller gets
    one clear error, every rank process is gone, and what it yielded before stays right (the jobs layer has
    written it: a rerun resumes from there)."""
    import os
    import signal

    model = synth(tmp_path / "llama", "llama")
    ref = ReferenceModel.load(model, dtype="float32")
    prompts, _ = job(ref.spec.vocab_size, 24, seed=9)
    expected = ref.greedy(prompts, 16)
    gen = SplitStreamGenerator(model, streamed_plan(model, 24), world=2, device="cpu", build={"dtype": "float32"},
                               threads=1)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=1 if i < 2 else 16, ignore_eos=True)) for i, p in enumerate(prompts)]
    got = []
    with pytest.raises(OffbatchError, match="died|failed"):
        for out in gen.generate(reqs):
            got.append(out)
            if len(got) == 1:
                os.kill(gen.procs[1].pid, signal.SIGKILL)
    assert got and all(o.token_ids == expected[o.key][: len(o.token_ids)] for o in got)
    assert all(not p.is_alive() for p in gen.procs)


def test_closing_in_the_middle_of_a_job_ends_every_rank(tmp_path):
    """A run stopped while the ranks work (SIGTERM, an error in the jobs layer): close() ends them all."""
    model = synth(tmp_path / "llama", "llama")
    ref = ReferenceModel.load(model, dtype="float32")
    prompts, _ = job(ref.spec.vocab_size, 16, seed=2)
    gen = SplitStreamGenerator(model, streamed_plan(model, 16), world=2, device="cpu", build={"dtype": "float32"},
                               threads=1)
    outs = gen.generate([GenRequest(i, p, SamplingParams(max_tokens=1 if i == 0 else 16, ignore_eos=True))
                         for i, p in enumerate(prompts)])
    first = next(outs)
    assert first.token_ids == ref.greedy([prompts[first.key]], 1)[0]
    assert gen.busy
    gen.close()
    assert all(not p.is_alive() for p in gen.procs)
