"""Scale-out on Ray Data (offbatch/scale): `offbatch run --workers N` on one local Ray cluster with CPU
workers (a fraction of a CPU each: this machine may have 2), real engines and tiny synth models.

Every scaled run is compared, record for record, with the plain single-process run of the same job
(greedy and seeded sampling: a request's tokens do not depend on where it runs). One scaled run takes
~10 s here (the workers start Python and torch), so the cases share runs: the first job mixes a line the
driver refuses, a request that fails inside a worker's engine, and every record shape, and resumes from
an output file that already holds part of the job."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from jobs_support import WORDS, read_jsonl, write_jsonl
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.models.tokenizer import load_tokenizer
from offbatch.scale.shards import ShardPlan

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: `run --workers N` finds this process connected and uses it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def synth(folder: Path, family: str = "llama") -> Path:
    r = cli("synth", family, folder, "--seed", 3, "--quiet")
    assert r.exit_code == 0, r.output
    return folder


def by_id(path: Path) -> dict:
    """id -> record; an OpenAI record's `created` (the time it was written) is the one field that may differ
    between two runs."""
    recs = read_jsonl(path)
    ids = [r.get("custom_id", r.get("id")) for r in recs]
    assert len(ids) == len(set(ids)), "a request has two records"
    for r in recs:
        body = (r.get("response") or {}).get("body") if "custom_id" in r else None
        if isinstance(body, dict):
            body.pop("created", None)
    return dict(zip(ids, recs))


def assert_same_records(got: dict, want: dict) -> None:
    """Equal, field for field; log-probabilities within float32 noise (a worker batches a shard's sequences,
    not the whole job's, and a batch's shape changes a GEMM's summation order: the tokens stay the same)."""
    assert got.keys() == want.keys()

    def same(a, b, path):
        if isinstance(a, float) and "logprob" in path:
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), path
        elif isinstance(a, dict) and isinstance(b, dict):
            assert a.keys() == b.keys(), path
            for k in a:
                same(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]")
        else:
            assert a == b, path

    for key in want:
        same(got[key], want[key], str(key))


def poison_token(folder: Path, token: int) -> None:
    """Make `token` alone overflow: hidden dimension 0 is 0 for every token but this one (its embedding, and
    nothing attention writes there), and FFN unit 0 of layer 0 reads only that dimension, hugely, and writes
    3e38 a unit. A sequence that holds the token gets Inf, then NaN logits, and fails in the engine; every
    other one computes exact zeros there and runs as before. All weights stay finite (the folder passes
    validation)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    w = load_file(path)
    w["model.embed_tokens.weight"][:, 0] = 0.0
    w["model.embed_tokens.weight"][token, 0] = 1.0
    w["model.layers.0.self_attn.o_proj.weight"][0, :] = 0.0
    for name in ("gate_proj", "up_proj"):
        w[f"model.layers.0.mlp.{name}.weight"][0, :] = 0.0
        w[f"model.layers.0.mlp.{name}.weight"][0, 0] = 1000.0
    w["model.layers.0.mlp.down_proj.weight"][:, 0] = 3e38
    save_file(w, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("scale") / "llama")


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """(folder, the prompt that fails in the engine)."""
    folder = synth(tmp_path_factory.mktemp("scale") / "poisoned")
    tok = load_tokenizer(folder)
    prompt = "the moon over the dark sea"
    poison_token(folder, tok.encode(prompt)[-1])
    return folder, prompt


def mixed_job(path: Path, bad_prompt: str) -> tuple[Path, list[str]]:
    rows = [{"id": f"p{i}", "prompt": " ".join(WORDS[i:i + 3 + i % 4]), "max_tokens": 4 + i % 5} for i in range(14)]
    rows += [
        "{not json",  # refused by the driver: an error record, before any shard
        {"id": "poison", "prompt": bad_prompt},  # fails inside a worker's engine: generation_failed
        {"id": "two", "prompt": "tell me about the sun", "n": 2, "temperature": 0.9, "seed": 11, "logprobs": 2},
        {"id": "stop", "prompt": "one two three", "stop": ["e"], "max_tokens": 12},
        {"id": "chat", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6},
        {"custom_id": "batch", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "what is blue"}], "max_tokens": 5}},
    ]
    ids = [r.get("id", r.get("custom_id")) for r in rows if isinstance(r, dict)] + [15]  # line 15: its number
    return write_jsonl(path, rows), ids


def test_scaled_run_equals_the_single_process_run_record_for_record(cluster, poisoned, tmp_path):
    folder, bad_prompt = poisoned
    prompts, ids = mixed_job(tmp_path / "p.jsonl", bad_prompt)
    plain, scaled = tmp_path / "plain.jsonl", tmp_path / "scaled.jsonl"
    r = cli("run", folder, prompts, "-o", plain, "--max-tokens", 8)
    assert r.exit_code == 1, r.output  # some lines failed
    want = by_id(plain)
    assert set(want) == set(ids)
    assert want[15]["error"]["code"] == "invalid_request"
    assert want["poison"]["error"]["code"] == "generation_failed"
    ok = [k for k, rec in want.items() if rec.get("error") is None]
    assert len(ok) >= 12  # the rest completed

    # The scaled run resumes from an output that already holds three of the plain run's results.
    kept = [line for line in plain.read_text().splitlines() if json.loads(line).get("error") is None][:3]
    scaled.write_text("".join(line + "\n" for line in kept))
    (tmp_path / "scaled.jsonl.offbatch.json").write_bytes((tmp_path / "plain.jsonl.offbatch.json").read_bytes())
    r = cli("run", folder, prompts, "-o", scaled, "--max-tokens", 8, "--workers", 2, "--log-format", "json")
    assert r.exit_code == 1, r.output
    got = by_id(scaled)
    assert_same_records(got, want)  # texts, tokens, logprobs, error records, resume keys
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    messages = [e.get("message", "") for e in events]
    assert "resuming: 3 request(s) already have results in " + str(scaled) in messages
    ready = [e for e in events if e.get("message", "").startswith("worker ")]
    assert len(ready) == 2  # two workers loaded the model, each in its own process
    assert len({e["worker"] for e in ready}) == 2
    summary = events[-1]
    assert summary["event"] == "summary" and summary["ok"] == len(ok) - 3 and summary["failed"] == 2
    assert summary["already_done"] == 3 and summary["not_run"] == 0
    assert summary["device"] == "cpu: 2 Ray worker(s)"


def test_each_worker_plans_its_shard_with_the_streaming_engine(cluster, tmp_path, monkeypatch):
    """A MoE family through the streaming engine (the GPU workers' engine, here on the CPU under a cap that
    streams the weights): each worker plans for its own shards and runs them one after another; the records
    equal the plain run's."""
    monkeypatch.setattr("offbatch.scale.shards.MAX_SHARD_SEQUENCES", 3)  # the driver cuts 11 sequences in 4
    folder = synth(tmp_path / "mixtral", "mixtral")
    rows = [{"id": f"m{i}", "prompt": " ".join(WORDS[2 * i:2 * i + 2 + i % 5]), "max_tokens": 3 + i % 6}
            for i in range(11)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    engine = ["--engine", "streaming", "--device", "cpu", "--gpu-memory", "2MiB"]
    plain, scaled = tmp_path / "plain.jsonl", tmp_path / "scaled.jsonl"
    # A budget the model cannot run in fails in the workers as they plan: the plain run's one clear error
    # (exit 3), before the output is touched.
    r = cli("run", folder, prompts, "-o", scaled, *engine[:-1], "1KiB", "--workers", 2)
    assert r.exit_code == 3, r.output
    error = r.stderr.splitlines()[-1]
    assert error.startswith("offbatch: error: worker ") and "--gpu-memory" in error
    assert not scaled.exists() and not Path(str(scaled) + ".offbatch.json").exists()
    assert cli("run", folder, prompts, "-o", plain, *engine).exit_code == 0
    r = cli("run", folder, prompts, "-o", scaled, *engine, "--workers", 2, "--log-format", "json")
    assert r.exit_code == 0, r.output
    assert_same_records(by_id(scaled), by_id(plain))
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    ready = [e for e in events if e.get("message", "").startswith("worker ")]
    assert len(ready) == 2
    # 11 sequences in 4 shards (3, 3, 3, 2): each worker plans for the largest, not for the whole job.
    assert any("4 shard(s)" in e.get("message", "") for e in events)
    assert [e["planned_for"] for e in ready] == [3, 3]
    assert all(e["plan"]["wave_size"] <= 3 for e in ready)


def engine_worker_pids() -> list[int]:
    """The processes of Ray Data's engine actors (Ray titles them after the class they run)."""
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any("EngineWorker" in part for part in (p.info["cmdline"] or [])):
            pids.append(p.info["pid"])
    return pids


def test_workers_killed_mid_job_lose_nothing_and_write_nothing_twice(cluster, llama, tmp_path):
    half = 40  # sequences per shard: two shards, one per worker
    rows = [{"id": f"k{i}", "prompt": " ".join(WORDS[i % 40:i % 40 + 3])} for i in range(2 * half)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    job = ["--max-tokens", 24, "--ignore-eos"]
    out = tmp_path / "out.jsonl"
    killed = []

    def written() -> int:
        return out.read_bytes().count(b"\n") if out.exists() else 0

    def kill_the_workers_mid_shard():
        # Every engine worker at once: on a loaded machine one worker may start seconds after the other, and one
        # killed before its first result has its shard retried without a word. With fewer records out than a
        # shard holds, the shard that wrote them is part-way on a worker that dies, and its retry finds them done.
        deadline = time.monotonic() + 120  # a hang guard, not a speed check
        while time.monotonic() < deadline:
            n = written()
            if n >= half:
                return  # too late: the assertion below says the kill did not land
            if n >= 4:
                pids = engine_worker_pids()
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                if pids:
                    killed.append((pids, n))
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_workers_mid_shard)
    killer.start()
    # --max-batch 1: one sequence at a time, so each worker's shard takes a while.
    r = cli("run", llama, prompts, "-o", out, *job, "--max-batch", 1, "--workers", 2)
    killer.join()
    assert killed and killed[0][1] < len(rows), "the kill must land mid-job"
    # Ray started the workers again and retried the shards; the retry skipped what was already sent.
    assert r.exit_code == 0, r.output
    assert "shard" in r.stderr and "restarted on worker" in r.stderr
    restarted = next(line for line in r.stderr.splitlines() if "restarted on worker" in line)
    finished_before = int(restarted.split(": ")[-1].split(" of its ")[0])
    assert 1 <= finished_before < half and f"of its {half} sequences" in restarted

    # Every request exactly once, each the record the single-process run writes.
    plain = tmp_path / "plain.jsonl"
    assert cli("run", llama, prompts, "-o", plain, *job, "--max-batch", 64).exit_code == 0
    assert_same_records(by_id(out), by_id(plain))
    assert len(by_id(out)) == len(rows)
    # And the rerun has nothing left to do.
    before = out.read_bytes()
    r = cli("run", llama, prompts, "-o", out, *job, "--workers", 2)
    assert r.exit_code == 0, r.output
    assert f"resuming: {len(rows)} request(s) already have results" in r.stderr
    assert out.read_bytes() == before


def test_without_ray_the_flags_are_one_clear_error_and_nothing_is_written(llama, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "the sky"}])
    out = tmp_path / "out.jsonl"
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is missing
    for flags in (["--workers", 2], ["--ray", "auto"]):
        r = cli("run", llama, prompts, "-o", out, *flags)
        assert r.exit_code == 3, r.output
        assert "pip install 'offbatch[ray]'" in r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # no output, lock or header


def test_scaled_options_that_cannot_work_are_refused_before_any_work(llama, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "the sky"}])
    r = cli("run", llama, prompts, "-o", tmp_path / "out.jsonl", "--workers", 2, "--device", "cuda:1")
    assert r.exit_code == 3 and "each worker computes on its own GPU" in r.stderr
    r = cli("run", llama, prompts, "-o", tmp_path / "out.jsonl", "--workers", 0)
    assert r.exit_code == 2  # a usage error
    r = cli("run", llama, prompts, "-o", tmp_path / "out.jsonl", "--ray", " ")
    assert r.exit_code == 2 and "--ray" in r.output and not (tmp_path / "out.jsonl").exists()
    r = cli("run", llama, prompts, "-o", tmp_path / "out.jsonl", "--ray", "127.0.0.1:1")  # nothing listens there
    assert r.exit_code == 3 and "cannot connect to the Ray cluster at 127.0.0.1:1" in r.stderr
    assert "ray start --head" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_a_pipeline_failure_is_raised_as_what_it_is():
    from offbatch.errors import BudgetError, OffbatchError
    from offbatch.scale.generator import pipeline_error

    def raised(cause):
        try:
            raise RuntimeError("the pipeline's wrapper") from cause
        except RuntimeError as e:
            return pipeline_error(e)

    budget = BudgetError("--gpu-memory 1 KiB is too small")
    assert raised(budget) is budget  # a worker's own error, as a plain run raises it
    lost = raised(ray.exceptions.ActorDiedError())  # a worker lost more often than Ray restarts it
    assert isinstance(lost, OffbatchError) and "rerun the same command to resume" in str(lost)
    other = raised(ValueError("boom"))
    assert type(other) is RuntimeError and "ValueError: boom" in str(other)  # a bug: exit 4


def test_shards_deal_sequences_round_robin_and_plan_for_the_longest():
    plan = ShardPlan(sequences=7, workers=2)
    assert (plan.shards, plan.pool_size) == (2, 2)
    assert [plan.shard_of(k) for k in range(7)] == [0, 1, 0, 1, 0, 1, 0]
    assert list(plan.members(1)) == [1, 3, 5]
    prompt_lens, gen_lens = [5, 9, 5, 5, 5, 5, 5], [4, 4, 4, 4, 4, 20, 4]
    p, g = plan.worker_lengths(prompt_lens, gen_lens)
    # Shard 0 (4 sequences) with the job's longest prompt (index 1) and longest context (index 5) in it.
    assert len(p) == 4 and max(p) == 9 and max(a + b for a, b in zip(p, g)) == 25
    assert ShardPlan(sequences=1, workers=4).pool_size == 1  # never more workers than shards
    big = ShardPlan(sequences=40000, workers=2)
    assert big.shards == 4 and big.pool_size == 2  # shards past MAX_SHARD_SEQUENCES: more than one each


def test_the_cluster_view_says_when_workers_stream_for_smaller_waves():
    from offbatch.scale.plan_view import small_wave_note

    rows = [{"wave": 1024}, {"wave": 1024}]
    note = small_wave_note(rows, 2048, 2, 1.46)
    assert "wave of 1024" in note and "2048" in note and "1.46x, not 2x" in note
    assert small_wave_note(rows, 1024, 2, 1.46) is None  # the same wave as one GPU's
    assert small_wave_note(rows, 2048, 2, 1.9) is None  # it scales
    assert small_wave_note(rows[:1], 2048, 1, 1.0) is None


def test_plan_for_workers_shows_each_workers_plan_and_the_jobs_time(llama, tmp_path):
    r = cli("plan", llama, "--hardware", "cpu", "--num-prompts", 64, "--prompt-len", 16, "--gen-len", 8,
            "--gpu-memory", "4MiB", "--workers", 3, "--workers-per-host", 3, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    cluster = report["cluster"]
    workers = cluster["per_worker"]
    assert [w["sequences"] for w in workers] == [22, 21, 21]
    assert report["workload"]["num_requests"] == 22  # the plan shown is the first worker's
    assert cluster["job_s"] == max(w["total_s"] for w in workers)
    for w in workers:
        assert w["total_s"] == pytest.approx(w["load_s"] + w["run_s"])
    one = cluster["one_worker"]
    assert cluster["speedup"] == pytest.approx(one["total_s"] / cluster["job_s"])
    # Three workers share the host's memory: each plans for a third of what one would.
    from offbatch.planner.solve import HOST_SHARE, resolve_hardware

    host = resolve_hardware("cpu", "cpu").host.memory_bytes
    assert cluster["worker_cpu_memory"] == int(HOST_SHARE * host / 3)
    r = cli("plan", llama, "--hardware", "cpu", "--workers-per-host", 2)
    assert r.exit_code == 3 and "--workers-per-host is for --workers" in r.stderr


def test_workers_that_split_their_weight_stream_equal_the_plain_run(cluster, llama, tmp_path):
    """`--workers 1 --split-stream 2`: the Ray worker runs one engine over two rank processes (CPU: gloo)
    that split the weight stream; the records equal the plain run's."""
    rows = [{"id": f"s{i}", "prompt": " ".join(WORDS[i:i + 2 + i % 4]), "max_tokens": 2 + i % 5} for i in range(7)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    engine = ["--engine", "streaming", "--device", "cpu", "--gpu-memory", "2MiB"]
    plain, scaled = tmp_path / "plain.jsonl", tmp_path / "scaled.jsonl"
    assert cli("run", llama, prompts, "-o", plain, *engine).exit_code == 0
    r = cli("run", llama, prompts, "-o", scaled, *engine, "--workers", 1, "--split-stream", 2, "--log-format", "json")
    assert r.exit_code == 0, r.output
    assert_same_records(by_id(scaled), by_id(plain))
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    ready = [e for e in events if e.get("message", "").startswith("worker ")]
    assert len(ready) == 1 and ready[0]["plan"]["split_stream"] == 2
