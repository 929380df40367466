"""`offbatch run` through typer's CliRunner, on EchoGenerator (a fake engine with predictable text): input
shapes, output shapes, bad lines, stop rules, stdin/stdout, --errors, --dry-run, resume, logs, exit codes.
The same command on the real reference engine is in test_jobs_e2e.py."""

import io
import json
from datetime import datetime, timedelta

import pytest
import torch
from jobs_support import VOCAB, EchoGenerator, read_jsonl, write_jsonl, write_tokenizer
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.jobs.progress import Progress


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Config and tokenizer only: EchoGenerator needs no weights."""
    folder = tmp_path_factory.mktemp("echo_model")
    write_tokenizer(folder, generation_config={"do_sample": True, "temperature": 0.8, "max_new_tokens": 40})
    config = {"model_type": "llama", "vocab_size": len(VOCAB), "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def engine(monkeypatch):
    """Patch the engine factory; the test sees every generator made (so it can check what ran)."""
    made = []

    def factory(model_dir, tokenizer, options):
        made.append(EchoGenerator(max_batch=options.max_batch))
        return made[-1]

    monkeypatch.setattr("offbatch.engine.select.make_generator", factory)
    return made


def run(*args, input=None):
    return CliRunner().invoke(app, ["run", *map(str, args)], input=input)


def by_id(path):
    """Records by request id; a success wins over a duplicate id's error record."""
    out = {}
    for r in read_jsonl(path):
        key = r.get("custom_id", r.get("id"))
        if key not in out or out[key]["error"]:
            out[key] = r
    return out


# ---- shapes -------------------------------------------------------------------------------------

def test_three_shapes_and_bad_lines(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "plain", "prompt": "one two three four five", "max_tokens": 3},
        {"id": "chat", "messages": [{"role": "user", "content": "hello world"}]},
        {"custom_id": "oc", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": "what is the sun"}]}},
        {"custom_id": "ok", "method": "POST", "url": "/v1/completions",
         "body": {"model": "x", "prompt": "the sea </s> big", "max_tokens": 9}},
        "this is not json",
        {"id": "nothing"},
        {"id": "hot", "prompt": "x", "temperature": -1},
        {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"id": "long", "prompt": " ".join(["sky"] * 80)},
        {"id": "plain", "prompt": "duplicate id"},
    ])
    out = tmp_path / "out.jsonl"
    r = run(model, prompts, "-o", out)
    assert r.exit_code == 1, r.output  # some lines failed
    res = by_id(out)
    assert len(read_jsonl(out)) == 10  # every line has exactly one record

    assert res["plain"]["text"] == "one two" and res["plain"]["finish_reason"] == "length"
    assert (res["plain"]["prompt_tokens"], res["plain"]["completion_tokens"]) == (6, 3)
    # Echo of "<|user|> hello world <|end|> <|assistant|>": stops at the second eos id, <|end|>.
    assert res["chat"]["text"] == "hello world" and res["chat"]["finish_reason"] == "stop"
    oc = res["oc"]["response"]["body"]
    assert res["oc"]["response"]["status_code"] == 200 and res["oc"]["error"] is None
    assert oc["choices"][0]["message"] == {"role": "assistant", "content": "what is the sun"}
    assert oc["choices"][0]["finish_reason"] == "stop"
    ok = res["ok"]["response"]["body"]
    assert ok["choices"][0]["text"] == "the sea" and ok["choices"][0]["finish_reason"] == "stop"
    assert ok["usage"]["prompt_tokens"] == 5

    errors = {k: v["error"] for k, v in res.items() if v["error"]}
    assert errors[5]["line"] == 5 and "not valid JSON" in errors[5]["message"]
    assert "no prompt" in errors["nothing"]["message"]
    assert "temperature must be" in errors["hot"]["message"] and "-1" in errors["hot"]["message"]
    assert "unknown url" in errors["emb"]["message"] and res["emb"]["response"]["status_code"] == 400
    assert "context is 64" in errors["long"]["message"]
    dup = [x for x in read_jsonl(out) if x.get("id") == "plain" and x["error"]]
    assert len(dup) == 1 and "duplicate id" in dup[0]["error"]["message"] and dup[0]["error"]["line"] == 10

    assert "line 5" in r.stderr and "unknown url" in r.stderr
    # The run says where each default came from.
    assert "from generation_config.json: max_tokens=40, temperature=0.8" in r.stderr
    assert "4 ok, 6 failed" in r.stderr


def test_all_ok_exit_zero_and_stdin_stdout(model, engine):
    lines = json.dumps({"id": 1, "prompt": "yes no", "max_tokens": 2}) + "\n"
    r = run(model, "-", "-o", "-", "--quiet", input=lines)
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["text"] for x in r.stdout.splitlines()] == ["yes"]
    assert r.stderr == ""  # --quiet: nothing but errors


# ---- stop rules ---------------------------------------------------------------------------------

STOPS = [
    ({"prompt": "one two three four", "max_tokens": 3}, "one two", "length"),
    ({"prompt": "one two </s> three", "max_tokens": 9}, "one two", "stop"),
    ({"prompt": "one <|end|> two", "max_tokens": 9}, "one", "stop"),  # eos list from generation_config
    ({"prompt": "one two </s> three", "max_tokens": 6, "ignore_eos": True}, "one two three", "length"),
    ({"prompt": "one two three four", "stop_token_ids": [VOCAB.index("three")]}, "one two", "stop"),
    ({"prompt": "one two three four", "stop": ["three f"]}, "one two ", "stop"),  # across tokens
    ({"prompt": "one two three four", "stop": ["nothing", "wo th"]}, "one t", "stop"),  # inside tokens
    ({"prompt": "one two three four", "stop": "one", "max_tokens": 9}, "", "stop"),
]


@pytest.mark.parametrize("line,text,finish", STOPS)
def test_stop_rules(model, engine, tmp_path, line, text, finish):
    out = tmp_path / "out.jsonl"
    r = run(model, write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "temperature": 0, **line}]), "-o", out)
    assert r.exit_code == 0, r.output
    [res] = read_jsonl(out)
    assert (res["text"], res["finish_reason"]) == (text, finish)


def test_flags_override_generation_config_and_lines_override_flags(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "one two three four five six"},
        {"id": "b", "prompt": "one two three four five six", "max_tokens": 5, "stop": "nothing"},
    ])
    out = tmp_path / "out.jsonl"
    r = run(model, prompts, "-o", out, "--max-tokens", "3", "--stop", "four", "--temperature", "0")
    assert r.exit_code == 0, r.output
    res = by_id(out)
    assert res["a"]["text"] == "one two" and res["b"]["text"] == "one two three four"
    assert "from flags: max_tokens=3, temperature=0.0, stop=['four']" in r.stderr


# ---- files --------------------------------------------------------------------------------------

def test_errors_file(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "yes", "max_tokens": 1}, "bad"])
    out, errs = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    r = run(model, prompts, "-o", out, "--errors", errs)
    assert r.exit_code == 1
    assert [x["id"] for x in read_jsonl(out)] == ["a"]
    assert [x["error"]["line"] for x in read_jsonl(errs)] == [2]
    # Fixed input: the errors file is rewritten (empty), the fixed line runs, "a" is not redone.
    write_jsonl(prompts, [{"id": "a", "prompt": "yes", "max_tokens": 1}, {"prompt": "no", "max_tokens": 1}])
    r = run(model, prompts, "-o", out, "--errors", errs)
    assert r.exit_code == 0, r.output
    assert errs.read_text() == "" and sorted(map(str, by_id(out))) == ["2", "a"]
    assert engine[-1].seen_keys == [0]  # only one request generated


def test_dry_run_counts_and_writes_nothing(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "one two three", "max_tokens": 4},
                                                {"messages": [{"role": "user", "content": "hello"}]}])
    out = tmp_path / "out.jsonl"
    r = run(model, prompts, "-o", out, "--dry-run", "--log-format", "json")
    assert r.exit_code == 0, r.output
    summary = [json.loads(x) for x in r.stderr.splitlines() if '"dry_run"' in x][0]
    # "<s> one two three" = 4 tokens; chat "<|user|> hello <|end|> <|assistant|>" = 4 tokens.
    assert summary["valid"] == 2 and summary["errors"] == 0
    assert summary["prompt_tokens"] == 8 and summary["max_new_tokens"] == 4 + 40
    assert not out.exists() and engine == []
    write_jsonl(prompts, [{"prompt": "x", "top_p": 9}])
    r = run(model, prompts, "-o", out, "--dry-run")
    assert r.exit_code == 1 and "top_p must be in (0, 1]" in r.stderr and not out.exists()


def test_resume_skips_done_redoes_changed_and_torn(model, engine, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "one two three", "max_tokens": 2} for i in range(5)]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run(model, prompts, "-o", out).exit_code == 0
    assert run(model, prompts, "-o", out).exit_code == 0
    assert len(engine) == 1  # nothing left to do: no generator was even built
    # r1 changes content; r3's line is torn off as if a crash cut it.
    rows[1]["prompt"] = "four five six"
    write_jsonl(prompts, rows)
    lines = out.read_text().splitlines(keepends=True)
    torn = [x for x in lines if '"r3"' in x][0]
    out.write_text("".join(x for x in lines if x is not torn) + torn[:25])
    r = run(model, prompts, "-o", out)
    assert r.exit_code == 0, r.output
    assert "1 request(s) changed" in r.stderr and '"r1"' in r.stderr and "cut short" in r.stderr
    res = read_jsonl(out)
    assert sorted(x["id"] for x in res) == [f"r{i}" for i in range(5)]  # each exactly once
    assert by_id(out)["r1"]["text"] == "four"
    assert len(engine[-1].seen_keys) == 2


def test_overwrite_starts_afresh(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "yes", "max_tokens": 1}])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "zzz", "text": "old", "error": null}\n')
    assert run(model, prompts, "-o", out, "--overwrite").exit_code == 0
    assert [x["id"] for x in read_jsonl(out)] == ["a"]


# ---- logs ---------------------------------------------------------------------------------------

def test_json_log_lines(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "yes", "max_tokens": 1}, "bad"])
    r = run(model, prompts, "-o", tmp_path / "o.jsonl", "--log-format", "json", "--log-interval", "0.1")
    events = [json.loads(x) for x in r.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "info" and "line_error" in kinds and kinds[-1] == "summary"
    for e in events:  # every line is stamped: ISO-8601, UTC
        assert e["ts"].endswith("Z") and datetime.fromisoformat(e["ts"][:-1] + "+00:00").utcoffset() == timedelta(0)
    s = events[-1]
    assert (s["ok"], s["failed"], s["completion_tokens"]) == (1, 1, 1)
    threads = torch.get_num_threads()
    assert s["device"] == f"cpu ({threads} thread{'s' if threads > 1 else ''})" and s["load_s"] >= 0
    assert [e for e in events if e.get("load_s") is not None and e["event"] == "info"]  # "model loaded in ..."
    assert s["peak_host_bytes"] > 10 * 2**20 and s["peak_gpu_bytes"] == 0
    sampling = [e for e in events if "sources" in e][0]
    assert sampling["sources"]["temperature"] == "generation_config.json"


def test_text_log_lines_when_not_a_terminal(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "yes", "max_tokens": 1}])
    r = run(model, prompts, "-o", tmp_path / "o.jsonl")
    assert r.exit_code == 0
    assert r.stderr.splitlines()[-1].startswith("done: 1 ok, 0 failed")
    # A CPU run says so (and has no GPU peak to report); the model's load time is apart from the wall.
    assert "| cpu (" in r.stderr and "), peak host" in r.stderr and "peak GPU" not in r.stderr
    assert "tok/s" in r.stderr and "model load" in r.stderr


# ---- paths and fatal errors ---------------------------------------------------------------------

def test_model_as_option_or_default(model, engine, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "yes", "max_tokens": 1}])
    assert run("--model", model, prompts, "-o", tmp_path / "a.jsonl").exit_code == 0
    monkeypatch.setattr("offbatch.tools.default_model.default_model_dir", lambda announce=None: model)
    r = run(prompts, "-o", tmp_path / "b.jsonl")
    assert r.exit_code == 0, r.output
    assert str(model) in r.stderr
    r = run(model, prompts, "--model", model, "-o", tmp_path / "c.jsonl")
    assert r.exit_code == 2 and "given twice" in r.output


@pytest.mark.parametrize("case", ["no_prompts", "bad_model", "same_file", "output_dir"])
def test_fatal_errors_exit_3_without_traceback(model, engine, tmp_path, case):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "yes"}])
    args = {
        "no_prompts": (model, tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl"),
        "bad_model": (tmp_path, prompts, "-o", tmp_path / "o.jsonl"),
        "same_file": (model, prompts, "-o", prompts),
        "output_dir": (model, prompts, "-o", tmp_path),
    }[case]
    r = run(*args)
    assert r.exit_code == 3, r.output
    assert r.stderr.count("offbatch: error:") == 1 and "Traceback" not in r.output


def test_bad_flag_is_a_usage_error(model, engine, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "yes"}])
    r = run(model, prompts, "-o", tmp_path / "o.jsonl", "--top-p", "2")
    assert r.exit_code == 2 and "top_p" in r.output


# ---- progress that tells the truth (a fake clock: no wall-clock assertions) ----------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def progress_with(clock, generated):
    """A json-mode Progress whose live generated-token count is generated[0] (what the engine's stats say,
    finished or not)."""
    p = Progress("json", stream=io.StringIO(), clock=clock, live_tokens=lambda: (0, generated[0]))
    return p


def test_eta_from_tokens_not_from_request_counts():
    """Two requests of 50 tokens finished in 10 s and 60 tokens are in flight: 8 remain, ~50 tokens each,
    at the 16 tok/s measured. The request-count ETA said 10 / 2 x 8 = 40 s."""
    clock, generated = Clock(), [0]
    p = progress_with(clock, generated)
    p.start(total=10)
    clock.now += 10
    generated[0] = 160
    p.add(ok=True, prompt_tokens=5, completion_tokens=50)
    p.add(ok=True, prompt_tokens=5, completion_tokens=50)
    assert p.eta() == pytest.approx((8 * 50 - 60) / 16)


def test_eta_before_any_finish_uses_max_tokens_and_the_plans_rate():
    clock, generated = Clock(), [0]
    p = progress_with(clock, generated)
    p.start(total=4, planned_tokens=4 * 100, predicted_gen_tok_s=50.0)
    assert p.eta() == pytest.approx(400 / 50)
    clock.now += 2
    generated[0] = 100
    assert p.eta() == pytest.approx(300 / 50)
    # No plan (the reference engine): the measured rate.
    q = progress_with(clock, generated)
    q.start(total=4, planned_tokens=400)
    assert q.eta() is None  # nothing measured yet (the engine's count starts at 100), nothing predicted
    clock.now += 5
    generated[0] = 150  # 50 tokens in 5 s since start
    assert q.eta() == pytest.approx((400 - 50) / 10)


def test_error_records_are_not_work_done():
    """100 bad lines are written at once, then one request of 10 tokens finishes after 10 s. The old ETA
    counted the error records as finished work: 10 s / 101 x 9 = 0.9 s. Now: 9 x 10 tokens at 1 tok/s."""
    clock, generated = Clock(), [0]
    p = progress_with(clock, generated)
    p.start(total=110)
    for _ in range(100):
        p.add(ok=False)
    clock.now += 10
    generated[0] = 10
    p.add(ok=True, prompt_tokens=3, completion_tokens=10)
    assert p.eta() == pytest.approx(90.0)
    p.tick()
    line = json.loads(p.stream.getvalue().splitlines()[-1])
    assert line["event"] == "progress" and line["ts"].endswith("Z")
    assert (line["done"], line["ok"], line["failed"], line["total"]) == (101, 1, 100, 110)
    assert line["gen_tok_s"] == 1.0 and line["eta_s"] == 90.0
    s = p.summary()
    assert (s["ok"], s["failed"], s["completion_tokens"]) == (1, 100, 10)


def test_recent_rates_follow_the_run_while_the_average_lags():
    """10 tok/s for 100 s, then 1 tok/s for 60 s: the last 30 s say 1 tok/s, the whole run 6.6."""
    clock, generated = Clock(), [0]
    p = progress_with(clock, generated)
    p.start(total=1000)
    for second in range(1, 161):
        clock.now += 1
        generated[0] += 10 if second <= 100 else 1
        p.recent_rates()  # sampled as the log ticker and the bar do
    assert p.recent_rates()[1] == pytest.approx(1.0)
    assert p.rates()[1] == pytest.approx(1060 / 160)


def test_summary_has_load_time_and_device():
    clock, generated = Clock(), [0]
    p = progress_with(clock, generated)
    p.device = "cpu (2 threads)"

    def make():
        clock.now += 7.5
        return "generator"

    assert p.load(make) == "generator" and p.load_s == 7.5
    p.start(total=0)
    s = p.summary()
    assert (s["load_s"], s["device"]) == (7.5, "cpu (2 threads)")
    lines = [json.loads(x) for x in p.stream.getvalue().splitlines()]
    assert lines[0]["message"] == "model loaded in 7.5s on cpu (2 threads)" and all("ts" in x for x in lines)
    text = Progress("text", stream=io.StringIO(), clock=clock)
    text.device, text.load_s = "NVIDIA H200 (cuda)", 3.0
    text.start(total=0)
    text.summary(peak_gpu_bytes=2**30)
    assert "model load 3.0s" in text.stream.getvalue() and "NVIDIA H200 (cuda), peak GPU 1" in text.stream.getvalue()
