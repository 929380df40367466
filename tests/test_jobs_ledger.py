"""offbatch/jobs/results.py and ledger.py: record shapes, the flushed writer, and resume planning."""

import json

from offbatch.jobs.ledger import apply_resume, plan_resume, record_key
from offbatch.jobs.requests import LineError, parse_line
from offbatch.jobs.results import error_record, ok_record, result_text
from offbatch.jobs.writer import ResultWriter


def req(obj, line=1):
    return parse_line(line, json.dumps(obj).encode())


PLAIN = {"id": "p", "prompt": "x"}
CHAT = {"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}}
COMP = {"custom_id": "k", "url": "/v1/completions", "body": {"prompt": "x"}}


def test_plain_record():
    r = req(PLAIN)
    rec = ok_record(r, "hi", "stop", 3, 2, "m")
    assert rec == {"id": "p", "text": "hi", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2,
                   "error": None, "input_hash": r.input_hash}
    assert record_key(rec) == ('"p"', r.input_hash)


def test_openai_chat_and_completion_records():
    r = req(CHAT)
    rec = ok_record(r, "hi", "length", 3, 2, "tiny")
    assert rec["custom_id"] == "c" and rec["error"] is None and rec["id"] == "batch_req_" + r.input_hash
    body = rec["response"]["body"]
    assert rec["response"]["status_code"] == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert record_key(rec) == ('"c"', r.input_hash)
    body = ok_record(req(COMP), "yo", "stop", 1, 1, "tiny")["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "yo"


def test_error_records():
    e = LineError(4, "q", "plain", "bad", "h1")
    assert error_record(e) == {"id": "q", "text": None, "finish_reason": None, "prompt_tokens": None,
                               "completion_tokens": None, "error": {"line": 4, "message": "bad"}, "input_hash": "h1"}
    o = error_record(LineError(5, "c", "openai", "worse", "h2", "chat"))
    assert o["custom_id"] == "c" and o["error"] == {"line": 5, "message": "worse"}
    assert o["response"]["status_code"] == 400 and o["response"]["body"]["error"]["message"] == "worse"


def test_writer_flushes_each_record(tmp_path):
    path = tmp_path / "out.jsonl"
    w = ResultWriter(path, fsync_every=3600)
    w.write({"id": 1, "text": "ä"})
    # Readable by another reader before close: flushed, one whole line, UTF-8 kept as is.
    assert path.read_text(encoding="utf-8") == '{"id": 1, "text": "ä"}\n'
    w.write({"id": 2})
    w.close()
    w.close()  # idempotent
    assert len(path.read_text().splitlines()) == 2


def test_writer_fsyncs_on_a_timer_when_results_pause(tmp_path, monkeypatch):
    import time

    import offbatch.jobs.writer as results

    synced = []
    real_fsync = results.os.fsync
    monkeypatch.setattr(results.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    w = ResultWriter(tmp_path / "out.jsonl", fsync_every=0.05)
    w.write({"id": 1})
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced  # no further write was needed
    n = len(synced)
    time.sleep(0.2)
    assert len(synced) == n  # nothing new written: nothing to sync
    w.close()


def test_result_text_of_both_shapes():
    assert result_text(ok_record(req(PLAIN), "a", "stop", 1, 1, "m")) == "a"
    assert result_text(ok_record(req(CHAT), "b", "stop", 1, 1, "m")) == "b"
    assert result_text(ok_record(req(COMP), "c", "stop", 1, 1, "m")) == "c"
    assert result_text(error_record(LineError(1, "x", "openai", "bad", "h"))) is None
    assert result_text(error_record(LineError(1, "x", "plain", "bad", "h"))) is None


def test_writer_stdout(capsys):
    with ResultWriter("-") as w:
        w.write({"id": 1})
    assert capsys.readouterr().out == '{"id": 1}\n'


def write_lines(path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_no_file_nothing_done(tmp_path):
    plan = plan_resume(tmp_path / "none.jsonl", [req(PLAIN)])
    assert plan.done == set() and not plan.changed_any
    assert plan_resume("-", [req(PLAIN)]).done == set()


def test_done_torn_and_truncate(tmp_path):
    a, b = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"})
    out = tmp_path / "out.jsonl"
    write_lines(out, [ok_record(a, "t", "stop", 1, 1, "m")], tail=b'{"id": "b", "te')
    plan = plan_resume(out, [a, b])
    assert plan.done == {'"a"'} and plan.torn and not plan.rewrite
    apply_resume(out, plan)
    assert out.read_bytes().endswith(b"\n") and len(out.read_text().splitlines()) == 1


def test_errors_changed_duplicates_and_garbage_are_dropped(tmp_path):
    a, b, c = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"}), req(CHAT)
    old_b = req({"id": "b", "prompt": "old"})
    other = req({"id": "gone", "prompt": "z"})
    out = tmp_path / "out.jsonl"
    recs = [
        ok_record(a, "1", "stop", 1, 1, "m"),
        error_record(LineError(2, "e", "plain", "bad", "h")),
        ok_record(old_b, "2", "stop", 1, 1, "m"),  # b changed since
        ok_record(a, "1 again", "stop", 1, 1, "m"),  # a second answer for a
        ok_record(c, "3", "stop", 1, 1, "m"),
        ok_record(other, "4", "stop", 1, 1, "m"),  # no longer in the input: kept
    ]
    out.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in recs) + b"not json\n")
    plan = plan_resume(out, [a, b, c])
    assert plan.done == {'"a"', '"c"'}
    assert plan.changed == ["b"]
    assert (plan.dropped_errors, plan.dropped_other, plan.rewrite, plan.torn) == (1, 2, True, False)
    apply_resume(out, plan)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record_key(r)[0] for r in kept] == ['"a"', '"c"', '"gone"']
    assert kept[0]["text"] == "1"
    assert not (tmp_path / "out.jsonl.offbatch-tmp").exists()
