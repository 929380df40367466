"""Hostile request lines through the real `offbatch run` (reference engine, CPU, a tiny synth Llama with
the word tokenizer of jobs_support): every hostile line ends in an error record that says why (or runs,
for values that are harmless), the good lines mixed in get results, the run exits 1 with no traceback,
and a rerun resumes. Issue 12: a lone surrogate, a line nested 10^5 deep or a temperature of 1e-300
used to kill the whole job, and every rerun with it.

The whole corpus is one job file run once per module (plus one rerun and one --strict run); each case
then asserts on its own record."""

import json

import pytest
import torch
from jobs_support import read_jsonl, write_tokenizer
from typer.testing import CliRunner

from offbatch.cli.main import app
from offbatch.jobs.requests import MAX_LINE_BYTES, parse_line

GOOD = "the sky is blue and the sea is green"
CHAT = [{"role": "user", "content": "what is the capital of france"}]
BIG = 1e300  # a double that float32 rounds to inf, and 1e-300 to 0


def err(reason):
    return ("error", reason)


OK = ("ok", None)

# (case id, the line: a dict with its own "id", or raw text / bytes whose records carry the line number,
#  expected: ("error", part of the message) or ("ok", None))
CASES = [
    # -- lines that are not JSON offbatch can take
    ("lone-surrogate", '{"id": "s", "prompt": "sky \\ud800"}', err("lone surrogate (\\ud800: invalid Unicode)")),
    ("lone-surrogate-chat", '{"messages": [{"role": "user", "content": "\\udc00"}]}', err("lone surrogate")),
    ("nested-1e5", "[" * 100_000 + "]" * 100_000, err("nested deeper than 64 levels")),
    ("nested-1e5-in-field", '{"prompt": "x", "metadata": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
     err("nested deeper than 64 levels")),
    ("int-5000-digits", '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", err("integer of 5000 digits")),
    ("id-1e400", '{"id": 1e400, "prompt": "x"}', err("1e400, too large for a double")),
    ("NaN", '{"prompt": "x", "temperature": NaN}', err("NaN, which is not a JSON number")),
    ("Infinity", '{"prompt": "x", "top_p": Infinity}', err("Infinity, which is not a JSON number")),
    ("duplicate-key", '{"prompt": "x", "prompt": "y"}', err('the key "prompt" twice')),
    ("invalid-utf8", b'{"prompt": "\xc3\x28"}', err("not UTF-8 text (byte 0xc3 at column 13)")),
    ("raw-NUL", b'{"prompt": "a\x00b"}', err("not valid JSON (Invalid control character")),
    ("enormous-line", '{"prompt": "' + "sky " * (MAX_LINE_BYTES // 4) + '"}', err("the limit is 16,777,216")),
    ("truncated", '{"prompt": "x"', err("not valid JSON")),
    ("array-line", "[1, 2]", err("a line must be a JSON object, got list")),
    ("string-line", '"the sky"', err("a line must be a JSON object, got str")),
    ("empty-object", "{}", err("no prompt")),
    # -- harmless oddities that run
    ("bom-mid-file", b'\xef\xbb\xbf{"id": "bom", "prompt": "the sky"}', OK),
    ("escaped-NUL", {"prompt": "the \u0000 sky"}, OK),
    ("surrogate-pair", {"prompt": "the sky \U0001f600"}, OK),
    # -- float32 underflow and overflow in every numeric field
    ("temperature-1e-300", {"prompt": GOOD, "temperature": 1e-300}, OK),  # greedy: see the test below
    ("temperature-1e300", {"prompt": GOOD, "temperature": BIG}, err("temperature must be in [0, 100]")),
    ("top_p-1e-300", {"prompt": GOOD, "top_p": 1e-300, "temperature": 1}, OK),
    ("top_p-1e300", {"prompt": GOOD, "top_p": BIG}, err("top_p must be in (0, 1]")),
    ("min_p-1e-300", {"prompt": GOOD, "min_p": 1e-300, "temperature": 1}, OK),
    ("min_p-1e300", {"prompt": GOOD, "min_p": BIG}, err("min_p must be in [0, 1]")),
    ("top_k-1e300", {"prompt": GOOD, "top_k": BIG, "temperature": 1}, OK),
    ("repetition-1e-300", {"prompt": GOOD, "repetition_penalty": 1e-300}, err("repetition_penalty must be in [0.01")),
    ("repetition-1e300", {"prompt": GOOD, "repetition_penalty": BIG}, err("repetition_penalty must be in [0.01")),
    ("presence-1e300", {"prompt": GOOD, "presence_penalty": BIG}, err("presence_penalty must be in [-2, 2]")),
    ("frequency--1e300", {"prompt": GOOD, "frequency_penalty": -BIG}, err("frequency_penalty must be in [-2, 2]")),
    ("logit_bias-1e300", {"prompt": GOOD, "logit_bias": {"9": BIG}}, err("logit_bias[9] must be in [-100, 100]")),
    ("logit_bias-vocab", {"prompt": GOOD, "logit_bias": {"5000": 1}}, err("logit_bias: token id 5000 is out of range")),
    ("seed-1e300", {"prompt": GOOD, "seed": BIG}, err("seed must be a 64-bit integer")),
    ("max_tokens-1e300", {"prompt": GOOD, "max_tokens": BIG}, OK),  # clipped to the context
    ("min_tokens-1e300", {"prompt": GOOD, "min_tokens": BIG}, err("min_tokens (")),
    ("n-1e300", {"prompt": GOOD, "n": BIG}, err("n must be in [1, 128]")),
    ("top_logprobs-1e300", {"messages": CHAT, "logprobs": True, "top_logprobs": BIG}, err("top_logprobs must be in")),
    ("prompt-ids-huge", {"prompt": [1, 10**30]}, err("prompt: token id 1000000000000000000000000000000 is out")),
    # -- a wrong type for every field
    ("type-prompt", {"prompt": {"text": "x"}}, err("prompt must be a string")),
    ("type-messages", {"messages": "hello"}, err("messages must be a non-empty list")),
    ("type-content", {"messages": [{"role": "user", "content": 5}]}, err("content must be a string")),
    ("type-max_tokens", {"prompt": GOOD, "max_tokens": "5"}, err("max_tokens must be an integer")),
    ("type-temperature", {"prompt": GOOD, "temperature": "hot"}, err("temperature must be a number")),
    ("type-top_p", {"prompt": GOOD, "top_p": [0.5]}, err("top_p must be a number")),
    ("type-top_k", {"prompt": GOOD, "top_k": 1.5}, err("top_k must be an integer")),
    ("type-min_p", {"prompt": GOOD, "min_p": True}, err("min_p must be a number")),
    ("type-seed", {"prompt": GOOD, "seed": "7"}, err("seed must be an integer")),
    ("type-stop", {"prompt": GOOD, "stop": 5}, err("stop must be a string or a list")),
    ("type-stop_token_ids", {"prompt": GOOD, "stop_token_ids": "2"}, err("stop_token_ids must be a list")),
    ("type-ignore_eos", {"prompt": GOOD, "ignore_eos": "yes"}, err("ignore_eos must be true or false")),
    ("min_tokens-negative", {"prompt": GOOD, "min_tokens": -1}, err("min_tokens must be >= 0")),
    ("min_tokens-every-token-stops", {"prompt": GOOD, "min_tokens": 2, "stop_token_ids": list(range(512))},
     err("min_tokens (2) cannot be honoured")),  # was: "ok" with 0 tokens: min_tokens had banned them all
    ("type-repetition", {"prompt": GOOD, "repetition_penalty": "1"}, err("repetition_penalty must be a number")),
    ("type-presence", {"prompt": GOOD, "presence_penalty": None, "frequency_penalty": {}},
     err("frequency_penalty must be a number")),
    ("type-logit_bias", {"prompt": GOOD, "logit_bias": [[9, 1]]}, err("logit_bias must be an object")),
    ("type-logit_bias-key", {"prompt": GOOD, "logit_bias": {"sky": 1}}, err('"sky" is not a token id')),
    ("type-logprobs", {"prompt": GOOD, "logprobs": "yes"}, err("logprobs must be an integer")),
    ("type-logprobs-chat", {"messages": CHAT, "logprobs": 3}, err("logprobs must be true or false for chat")),
    ("type-n", {"prompt": GOOD, "n": "2"}, err("n must be an integer")),
    ("type-skip_special", {"prompt": GOOD, "skip_special_tokens": "no"}, err("skip_special_tokens must be true")),
    ("type-template-kwargs", {"messages": CHAT, "chat_template_kwargs": "x"}, err("chat_template_kwargs must be")),
    ("template-kwargs-clash", {"messages": CHAT, "chat_template_kwargs": {"messages": []}},
     err("may not set 'messages'")),
    ("type-content-part-text", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     err('messages[0]: a text content part needs a string "text", got 5')),  # was: "only text ..., got "text""
    ("type-content-part-no-text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     err('a text content part needs a string "text", got null')),
    ("type-id", {"id": [1], "prompt": GOOD}, err("id must be a string or an integer")),
    ("type-model", {"prompt": GOOD, "model": 5}, err("model must be a string")),
    ("type-body", {"custom_id": "b", "url": "/v1/completions", "body": [1]}, err("body must be a JSON object")),
    # -- fields that cannot be honoured
    ("tools", {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     err("tools is not supported")),
    ("response_format", {"custom_id": "rf", "url": "/v1/chat/completions",
                         "body": {"messages": CHAT, "response_format": {"type": "json_object"}}},
     err("response_format is not supported")),
    ("stream", {"prompt": GOOD, "stream": True}, err("stream is not supported")),
    ("echo", {"prompt": GOOD, "echo": True}, err("echo is not supported")),
    ("suffix", {"prompt": GOOD, "suffix": "end"}, err("suffix is not supported")),
    ("best_of", {"prompt": GOOD, "best_of": 3}, err("best_of is not supported")),
    # -- metadata and harmless values: accepted silently
    ("metadata", {"custom_id": "meta", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "gpt-4o-mini", "messages": CHAT, "user": "u1", "metadata": {"k": "v"},
                           "store": False, "service_tier": "auto", "stream": False, "echo": False,
                           "response_format": {"type": "text"}, "max_completion_tokens": 3}}, OK),
    # -- the new request fields, at their limits, run
    ("fields-at-limits", {"prompt": GOOD, "temperature": 100, "top_p": 1e-8, "presence_penalty": -2,
                          "frequency_penalty": 2, "repetition_penalty": 100, "logit_bias": {"9": -100, "10": 100},
                          "seed": 2**64 - 1, "n": 2, "logprobs": 5, "skip_special_tokens": False}, OK),
    ("chat-fields", {"messages": CHAT, "logprobs": True, "top_logprobs": 20, "chat_template_kwargs": {"x": [1]}}, OK),
    # -- unknown fields: a warning each without --strict (error records with it: see below)
    ("typo-temprature", {"prompt": GOOD, "temprature": 0.5}, OK),
    ("typo-max_token", {"prompt": GOOD, "max_token": 5}, OK),
]
GOOD_LINES = [
    {"id": "good-plain", "prompt": GOOD},
    {"id": "good-chat", "messages": CHAT},
    {"custom_id": "good-openai", "method": "POST", "url": "/v1/completions",
     "body": {"model": "m", "prompt": GOOD, "max_tokens": 3}},
]


def line_text(line) -> bytes:
    if isinstance(line, bytes):
        return line
    return (line if isinstance(line, str) else json.dumps(line)).encode()


def with_id(case_id, line):
    """Dict lines get the case id as their own id (unless they test the id); raw lines keep the line number."""
    if isinstance(line, dict) and not any(k in line for k in ("id", "custom_id")):
        return {"id": case_id, **line}
    return line


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from offbatch.tools.synth import synth_model

    folder = tmp_path_factory.mktemp("hostile") / "tiny"
    synth_model("llama", folder, seed=5, max_position=64)
    write_tokenizer(folder)  # the word tokenizer (its ids are the first of the model's 512): text easy to read
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


def record_id(rec):
    return rec.get("custom_id", rec.get("id"))


@pytest.fixture(scope="module")
def job(model, tmp_path_factory):
    """The corpus in one file, good lines first, in the middle and last; run, then rerun to resume."""
    folder = tmp_path_factory.mktemp("job")
    rows = [GOOD_LINES[0]] + [with_id(cid, line) for cid, line, _ in CASES]
    rows.insert(len(rows) // 2, GOOD_LINES[1])
    rows.append(GOOD_LINES[2])
    prompts = folder / "prompts.jsonl"
    prompts.write_bytes(b"".join(line_text(r) + b"\n" for r in rows))
    # case id -> the id its record carries: its own, or its line number where the id cannot be read
    numbers = {id(row): n for n, row in enumerate(rows, start=1)}
    keys = {}
    for cid, line, _ in CASES:
        row = next(r for r in rows if r == with_id(cid, line))
        keys[cid] = parse_line(numbers[id(row)], line_text(row)).id
    out = folder / "out.jsonl"
    first = run(model, prompts, "-o", out, "--max-tokens", "3")
    first_records = read_jsonl(out)
    second = run(model, prompts, "-o", out, "--max-tokens", "3")
    return {"rows": rows, "keys": keys, "first": first, "first_records": first_records, "second": second,
            "records": read_jsonl(out), "prompts": prompts, "out": out}


def records_by_id(records):
    out = {}
    for rec in records:
        out.setdefault(json.dumps(record_id(rec)), []).append(rec)
    return out


def test_corpus_size():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case_id,expected", [(cid, exp) for cid, _, exp in CASES], ids=[c for c, _, _ in CASES])
def test_each_hostile_line_gets_its_own_record(job, case_id, expected):
    recs = records_by_id(job["records"])[json.dumps(job["keys"][case_id])]
    assert len(recs) == 1, recs  # exactly one record per line, after the run and the rerun
    rec = recs[0]
    kind, reason = expected
    if kind == "error":
        assert rec["error"] is not None, rec
        assert reason in rec["error"]["message"], rec["error"]["message"]
        assert len(rec["error"]["message"]) < 300  # one clear line, not the input echoed back
    else:
        assert rec["error"] is None, rec["error"]


def test_good_lines_get_results_and_the_run_exits_1_without_a_traceback(job):
    by_id = records_by_id(job["records"])
    for good in GOOD_LINES:
        (rec,) = by_id[json.dumps(good.get("custom_id", good.get("id")))]
        assert rec["error"] is None
    for result in (job["first"], job["second"]):
        assert result.exit_code == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "Traceback" not in result.output
    assert len(job["records"]) == len(job["rows"])  # every line exactly one record, none lost


def test_rerun_resumes_and_keeps_every_result(job):
    """The second run finds the results of the first (the hostile lines in the job do not break the
    resume) and redoes only the error lines: the successful records are the same."""
    assert "resuming" in job["second"].output, job["second"].output
    ok_first = {json.dumps(record_id(r)): r for r in job["first_records"] if r["error"] is None}
    ok_now = {json.dumps(record_id(r)): r for r in job["records"] if r["error"] is None}
    assert ok_first and ok_first == ok_now


def test_temperature_underflow_is_greedy(job):
    by_id = records_by_id(job["records"])
    (tiny,) = by_id[json.dumps("temperature-1e-300")]
    (greedy,) = by_id[json.dumps("good-plain")]
    assert tiny["text"] == greedy["text"] and tiny["completion_tokens"] == greedy["completion_tokens"]


def test_unknown_fields_and_other_models_are_one_warning_each(job):
    output = job["first"].output
    assert 'unknown field "temprature" on 1 line(s) (did you mean "temperature"?) - ignored' in output
    assert 'unknown field "max_token" on 1 line(s) (did you mean "max_tokens"?) - ignored' in output
    assert output.count('unknown field "temprature"') == 1
    assert '2 line(s) name another model ("gpt-4o-mini" on 1, "m" on 1); this run uses tiny' in output


def test_strict_turns_unknown_fields_into_error_records(model, tmp_path):
    rows = [{"id": "typo", "prompt": GOOD, "temprature": 0.5, "max_token": 5}, {"id": "fine", "prompt": GOOD},
            {"custom_id": "top", "url": "/v1/completions", "temperature": 0.3, "body": {"prompt": GOOD}}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    r = run(model, prompts, "-o", out, "--max-tokens", "2", "--strict")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    recs = {record_id(rec): rec for rec in read_jsonl(out)}
    assert recs["typo"]["error"]["message"] == ('unknown field "temprature" (did you mean "temperature"?), '
                                                '"max_token" (did you mean "max_tokens"?); '
                                                "--strict makes unknown fields errors")
    assert "unknown field \"temperature\" (did you mean \"body.temperature\"?)" in recs["top"]["error"]["message"]
    assert recs["fine"]["error"] is None
    assert "ignored" not in r.output  # no warning: the error records say it


@pytest.mark.parametrize("flag,value,reason", [
    ("--presence-penalty", "3", "presence_penalty must be in [-2, 2]"),
    ("--frequency-penalty", "nan", "frequency_penalty must be a finite number"),
    ("--temperature", "1e300", "temperature must be in [0, 100]"),
    ("--repetition-penalty", "1e-300", "repetition_penalty must be in [0.01, 100]"),
])
def test_bad_flags_are_usage_errors(tmp_path, flag, value, reason):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    r = run(tmp_path / "no-model", prompts, "-o", tmp_path / "o.jsonl", flag, value)
    assert r.exit_code == 2 and reason in " ".join(r.output.replace("│", " ").split()), r.output



@pytest.mark.parametrize("engine", ["reference", "streaming"])
def test_min_tokens_passes_over_stop_strings_in_its_first_tokens(model, tmp_path, engine):
    """min_tokens holds stop strings back as it holds eos and stop tokens (vLLM's semantics): a stop string
    in the text of the first min_tokens - 1 tokens neither stops the request nor cuts its text. Before: the
    text was cut at that first occurrence, to "" here, while completion_tokens said 2."""
    def job(name, **fields):
        prompts = tmp_path / f"{name}.jsonl"
        prompts.write_text(json.dumps({"id": name, "prompt": GOOD, "max_tokens": 4, **fields}) + "\n")
        out = tmp_path / f"{name}.out.jsonl"
        r = run(model, prompts, "-o", out, "--engine", engine, "--device", "cpu", "--quiet")
        assert r.exit_code == 0, r.output
        (rec,) = read_jsonl(out)
        return rec

    greedy = job("greedy", logprobs=0, ignore_eos=True)
    first = greedy["logprobs"][0]["token"]
    assert first and greedy["completion_tokens"] == 4
    plain = job("stop", stop=[first], ignore_eos=True)
    assert plain["text"] == "" and plain["finish_reason"] == "stop"  # without min_tokens: stops at once
    held = job("held", stop=[first], ignore_eos=True, min_tokens=2)
    assert held["completion_tokens"] >= 2 and held["text"].startswith(first), held
    later = greedy["text"].find(first, len(first))  # where the stop string next begins, if it does
    assert held["text"] == (greedy["text"] if later < 0 else greedy["text"][:later])
