"""`offbatch run` on the real engine (ReferenceGenerator via engine/select.py) and a tiny random Llama
written by `offbatch synth llama`: greedy text equals a transformers greedy loop, seeded sampling is
batch-independent, and a run killed mid-way (SIGKILL, SIGTERM, SIGINT) resumes to every request
exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from jobs_support import WORDS, read_jsonl, synth_llama, write_jsonl
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.models.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth_llama(tmp_path_factory.mktemp("tiny_llama") / "m")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def with_eos(model: Path, folder: Path, eos: list[int]) -> Path:
    """The same model (weights linked) with another eos list in generation_config.json."""
    folder.mkdir()
    for f in model.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


def run(*args):
    r = CliRunner().invoke(app, ["run", *map(str, args)])
    return r


def texts(path):
    return {r.get("custom_id", r.get("id")): r for r in read_jsonl(path)}


def hf_greedy(model_dir, prompts: list[list[int]], n: int) -> list[list[int]]:
    """The oracle: transformers' own forward, full recompute each step, argmax."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            ids = list(ids)
            new = []
            for _ in range(n):
                nxt = int(hf(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(nxt)
            out.append(new)
    return out


def test_three_shapes_greedy_equals_transformers(model, tmp_path):
    tok = load_tokenizer(model)
    chat = [{"role": "user", "content": "what is the capital of france"}]
    rows = [{"id": f"p{i}", "prompt": " ".join(WORDS[i * 3:i * 3 + 2 + i])} for i in range(6)]
    rows += [
        {"id": "chat", "messages": chat},
        {"custom_id": "oc", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": chat + [{"role": "assistant", "content": "paris"},
                                                       {"role": "user", "content": "why"}]}},
        {"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "the sun is"}},
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    n = 12
    ids = [tok.encode(r["prompt"]) for r in rows[:6]]
    ids += [tok.encode_chat(chat), tok.encode_chat(rows[7]["body"]["messages"]), tok.encode("the sun is")]
    expected = hf_greedy(model, ids, n)
    keys = [r.get("id", r.get("custom_id")) for r in rows]

    def text_of(rec):
        if "response" not in rec:
            return rec["text"], rec["finish_reason"]
        choice = rec["response"]["body"]["choices"][0]
        return choice.get("text", choice.get("message", {}).get("content")), choice["finish_reason"]

    # With --ignore-eos every sequence runs its full length: the whole greedy continuation.
    out = tmp_path / "ignore.jsonl"
    r = run(model, prompts, "-o", out, "--max-tokens", n, "--ignore-eos", "--max-batch", "4")
    assert r.exit_code == 0, r.output
    got = texts(out)
    for key, exp in zip(keys, expected):
        assert text_of(got[key]) == (tok.decode(exp), "length"), key

    # Without it each stops at the first of its eos ids. A random model rarely says </s>, so the
    # eos list (from generation_config, plus the tokenizer's eos token) gets a word the greedy
    # continuations do produce: the eos path is then certainly taken, at a known place.
    word = expected[0][n // 2]
    eos_model = with_eos(model, tmp_path / "eos_model", [word])
    eos_ids = load_tokenizer(eos_model).eos_token_ids
    assert word in eos_ids and len(eos_ids) == 2  # and the tokenizer's own eos token
    out = tmp_path / "eos.jsonl"
    assert run(eos_model, prompts, "-o", out, "--max-tokens", n).exit_code == 0
    got = texts(out)
    stopped = 0
    for key, exp in zip(keys, expected):
        cut = next((i for i, t in enumerate(exp) if t in eos_ids), None)
        want = (tok.decode(exp[:cut]), "stop") if cut is not None else (tok.decode(exp), "length")
        assert text_of(got[key]) == want, key
        stopped += cut is not None
    assert stopped >= 1


def test_stop_strings_and_stop_token_ids(model, tmp_path):
    tok = load_tokenizer(model)
    prompt = {"id": "s", "prompt": "the sky is blue and the sea is"}
    full_out = tmp_path / "full.jsonl"
    assert run(model, write_jsonl(tmp_path / "a.jsonl", [prompt]), "-o", full_out, "--max-tokens", "16",
               "--ignore-eos").exit_code == 0
    ids = tok.encode(prompt["prompt"])
    [cont] = hf_greedy(model, [ids], 16)
    full = tok.decode(cont)
    assert read_jsonl(full_out)[0]["text"] == full

    # A stop token id: the text ends before its first occurrence.
    stop_id = cont[6]
    first = cont.index(stop_id)
    rows = [{**prompt, "id": "tid", "stop_token_ids": [stop_id], "ignore_eos": True}]
    # A stop string from the middle of the text (which may span tokens): cut before it.
    needle = full[len(full) // 2: len(full) // 2 + 3]
    rows.append({**prompt, "id": "str", "stop": ["no such text", needle], "ignore_eos": True})
    out = tmp_path / "stops.jsonl"
    assert run(model, write_jsonl(tmp_path / "b.jsonl", rows), "-o", out, "--max-tokens", "16").exit_code == 0
    got = texts(out)
    assert (got["tid"]["text"], got["tid"]["finish_reason"]) == (tok.decode(cont[:first]), "stop")
    assert got["tid"]["completion_tokens"] <= first + 1
    assert (got["str"]["text"], got["str"]["finish_reason"]) == (full[:full.find(needle)], "stop")
    assert got["str"]["completion_tokens"] < 16  # it stopped generating, not only cut the text


def test_bad_weights_fail_before_touching_the_output(model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model.iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).symlink_to(f)
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "x", "text": "earlier", "error": null}\n{"id": "torn", "te')
    before = out.read_bytes()
    # --overwrite: the output is not this job's (so it would be refused first); even so nothing in it
    # changes before the model has loaded.
    r = run(broken, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}]), "-o", out, "--overwrite")
    assert r.exit_code == 3 and "safetensors" in r.stderr and "Traceback" not in r.output
    assert out.read_bytes() == before


def test_seeded_sampling_is_batch_independent(model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": " ".join(WORDS[i:i + 2 + i % 6]), "ignore_eos": i % 3 != 0}
            for i in range(18)]
    prompts = write_jsonl(tmp_path / "all.jsonl", rows)
    flags = ["--temperature", "1.0", "--top-p", "0.95", "--top-k", "30", "--max-tokens", "14", "--seed", "7"]
    assert run(model, prompts, "-o", tmp_path / "b6.jsonl", "--max-batch", "6", *flags).exit_code == 0
    assert run(model, prompts, "-o", tmp_path / "b1.jsonl", "--max-batch", "1", *flags).exit_code == 0
    alone = write_jsonl(tmp_path / "alone.jsonl", rows[10:11])
    assert run(model, alone, "-o", tmp_path / "alone_out.jsonl", *flags).exit_code == 0

    b6, b1 = texts(tmp_path / "b6.jsonl"), texts(tmp_path / "b1.jsonl")
    assert {k: v["text"] for k, v in b6.items()} == {k: v["text"] for k, v in b1.items()}
    assert read_jsonl(tmp_path / "alone_out.jsonl")[0]["text"] == b6["r10"]["text"]
    # It really sampled: another base seed changes the text.
    assert run(model, alone, "-o", tmp_path / "seed8.jsonl", *flags[:-1], "8").exit_code == 0
    assert read_jsonl(tmp_path / "seed8.jsonl")[0]["text"] != b6["r10"]["text"]


# ---- interruption -------------------------------------------------------------------------------

# The killed run generates one sequence at a time (slow: it is still running when the signal comes,
# even on a fast machine); the reruns batch them all (fast).
JOB = ["--max-tokens", "12", "--ignore-eos"]
RERUN = [*JOB, "--max-batch", "64"]


def slow_job(tmp_path, n=120):
    rows = [{"id": f"k{i}", "prompt": " ".join(WORDS[i % 40:i % 40 + 3])} for i in range(n)]
    return write_jsonl(tmp_path / "p.jsonl", rows), rows


def start(model, prompts, out, preexec_fn=None):
    cmd = [sys.executable, "-m", "offbatch.cli.main", "run", str(model), str(prompts), "-o", str(out), *JOB,
           "--max-batch", "1", "--log-format", "json", "--log-interval", "0.5"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)


def wait_for_lines(proc, out: Path, n: int, timeout=60.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run made no progress")


def check_complete(out: Path, rows):
    data = out.read_bytes()
    assert data.endswith(b"\n")
    recs = [json.loads(line) for line in data.splitlines()]  # no torn line
    assert sorted(r["id"] for r in recs) == sorted(r["id"] for r in rows)  # each exactly once
    assert all(r["error"] is None and r["completion_tokens"] == 12 for r in recs)
    return {r["id"]: r["text"] for r in recs}


def test_sigkill_then_rerun_gives_each_request_once(model, tmp_path):
    prompts, rows = slow_job(tmp_path)
    out = tmp_path / "out.jsonl"
    proc = start(model, prompts, out)
    wait_for_lines(proc, out, 10)
    proc.kill()
    proc.wait()
    done_before = out.read_bytes().count(b"\n")
    assert 10 <= done_before < len(rows)
    with open(out, "ab") as f:  # and, as if the kill had landed mid-write, a torn last line
        f.write(b'{"id": "k119", "text": "half a li')
    r = run(model, prompts, "-o", out, *RERUN)
    assert r.exit_code == 0, r.output
    assert "cut short" in r.stderr and f"{done_before} request(s) already have results" in r.stderr
    resumed = check_complete(out, rows)
    # The resumed file holds the same greedy texts as one uninterrupted run.
    clean = tmp_path / "clean.jsonl"
    assert run(model, prompts, "-o", clean, *RERUN).exit_code == 0
    assert resumed == check_complete(clean, rows)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_stops_cleanly(model, tmp_path, sig, code):
    prompts, rows = slow_job(tmp_path)
    out = tmp_path / "out.jsonl"
    proc = start(model, prompts, out)
    wait_for_lines(proc, out, 4)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)  # a hang guard, not a speed check (no wall-clock assertions)
    assert proc.returncode == code, err
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["interrupted"] == signal.Signals(sig).name
    data = out.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == summary["ok"] < len(rows)
    assert all(json.loads(x)["error"] is None for x in data.splitlines())
    assert run(model, prompts, "-o", out, *RERUN).exit_code == 0
    check_complete(out, rows)


def test_an_ignored_sighup_stays_ignored(model, tmp_path):
    # Under nohup SIGHUP is ignored: the run must not take that back and stop when the terminal closes.
    prompts, rows = slow_job(tmp_path)
    out = tmp_path / "out.jsonl"
    proc = start(model, prompts, out, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_lines(proc, out, 2)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)  # a hang guard, not a speed check
    assert proc.returncode == 0, err
    check_complete(out, rows)


def test_streaming_engine_behind_run_gives_the_reference_results(model, tmp_path):
    """`run` with the streaming engine (CPU as compute device, a cap that forces weights to stream and
    sequences to wait for KV slots) writes the same results as with the reference engine."""
    rows = [{"id": f"s{i}", "prompt": " ".join(WORDS[i:i + 3 + i % 4]), "max_tokens": 6 + i % 5} for i in range(9)]
    rows.append({"id": "sampled", "prompt": "the sun is", "temperature": 0.8, "seed": 5, "max_tokens": 8})
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    ref, streamed = tmp_path / "ref.jsonl", tmp_path / "streamed.jsonl"
    assert run(model, prompts, "-o", ref, "--engine", "reference").exit_code == 0
    r = run(model, prompts, "-o", streamed, "--engine", "streaming", "--device", "cpu", "--gpu-memory", "1.2MiB")
    assert r.exit_code == 0, r.output
    a, b = texts(ref), texts(streamed)
    assert set(a) == set(b) == {row["id"] for row in rows}
    for key in a:
        assert (a[key]["text"], a[key]["finish_reason"]) == (b[key]["text"], b[key]["finish_reason"]), key
    # The job's log says the plan it runs: placement, batch sizes, the prediction and the bottleneck.
    assert "plan (solver): KV on the compute device (CPU), wave " in r.output and "bottleneck:" in r.output


def test_run_pins_a_saved_plan(model, tmp_path):
    rows = [{"id": f"p{i}", "prompt": " ".join(WORDS[i:i + 2 + i % 3]), "max_tokens": 5} for i in range(6)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    plan = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["plan", str(model), "--prompts", str(prompts), "--gpu-memory", "1.2MiB",
                                 "--hardware", "cpu", "--json", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())["plan"]
    ref, pinned = tmp_path / "ref.jsonl", tmp_path / "pinned.jsonl"
    assert run(model, prompts, "-o", ref, "--engine", "reference").exit_code == 0
    r = run(model, prompts, "-o", pinned, "--engine", "streaming", "--device", "cpu", "--plan", plan)
    assert r.exit_code == 0, r.output
    assert f"plan (from file): KV on the compute device (CPU), wave {saved['wave_size']}," in r.output
    a, b = texts(ref), texts(pinned)
    assert {k: v["text"] for k, v in a.items()} == {k: v["text"] for k, v in b.items()}
    # Bad uses are one clear error each, and the results file is left as it was.
    before = pinned.read_text()
    longer = write_jsonl(tmp_path / "long.jsonl", [{"id": "x", "prompt": "the sun is", "max_tokens": 400}])
    for args, words in (([prompts, "--engine", "reference", "--plan", plan], "--plan pins the streaming engine"),
                        ([longer, "--engine", "streaming", "--device", "cpu", "--plan", plan, "--overwrite"],
                             "the plan's context is"),
                        ([prompts, "--engine", "streaming", "--device", "cpu", "--plan", tmp_path / "none.json",
                          "--overwrite"], "cannot read the plan file")):
        r = run(model, args[0], "-o", pinned, *args[1:])
        assert r.exit_code == 3 and words in r.output and "Traceback" not in r.output, r.output
        assert pinned.read_text() == before


def test_unusable_device_or_engine_is_one_clear_error(model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the sun is"}])
    out = tmp_path / "out.jsonl"
    for flags, status, message in ((["--engine", "bogus"], 2, "'bogus': use streaming or reference"),
                                   (["--device", "tpu"], 3, "--device 'tpu'")):
        r = run(model, prompts, "-o", out, *flags)
        assert r.exit_code == status and message in r.output and "Traceback" not in r.output
        assert not out.exists()  # nothing written, nothing lost
    if not torch.cuda.is_available():
        r = run(model, prompts, "-o", out, "--device", "cuda")
        assert r.exit_code == 3 and "no CUDA GPU" in r.output
