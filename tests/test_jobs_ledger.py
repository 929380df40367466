"""offbatch/jobs/results.py, writer.py, ledger.py, lock.py and fingerprint.py: record shapes, the flushed
writer and its failures, the resume key, resume planning and its verdicts, the output lock, the model
fingerprint. The same through the real `offbatch run` is in test_hostile_outputs.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offbatch.errors import OutputFileError
from offbatch.jobs.fingerprint import describe_difference, model_fingerprint
from offbatch.jobs.ledger import (JobKey, Wanted, apply_resume, check_resume, header_path_for, plan_resume,
                                  read_header, record_key, settings_key_of, stamp_key, stamper, write_header)
from offbatch.jobs.lock import OutputLock, lock_path_for
from offbatch.jobs.requests import LineError, parse_line
from offbatch.jobs.results import error_record, ok_record, result_text
from offbatch.jobs.writer import ResultWriter, is_stream


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
    rec = error_record(e)
    assert (rec["id"], rec["text"], rec["input_hash"]) == ("q", None, "h1")
    assert (rec["error"]["line"], rec["error"]["message"]) == (4, "bad")
    assert record_key(rec) == ('"q"', "h1")
    o = error_record(LineError(5, "c", "openai", "worse", "h2", "chat"))
    assert o["custom_id"] == "c" and (o["error"]["line"], o["error"]["message"]) == (5, "worse")
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




# ---- the resume key in records ------------------------------------------------------------------

def test_stamp_and_read_the_key_in_both_shapes():
    plain, chat = ok_record(req(PLAIN), "a", "stop", 1, 1, "m"), ok_record(req(CHAT), "b", "stop", 1, 1, "m")
    assert settings_key_of(plain) is None and settings_key_of(chat) is None  # an older offbatch's records
    stamp_key(plain, "k1")
    stamp_key(chat, "k2")
    assert plain["settings_hash"] == "k1"
    assert chat["response"]["body"]["system_fingerprint"] == "fp_k2"  # where the Batch API keeps it
    assert settings_key_of(json.loads(json.dumps(plain))) == "k1" and settings_key_of(chat) == "k2"
    # The writer's stamp touches success records of known ids only.
    err = error_record(LineError(2, "p", "plain", "bad", "h"))
    stamp = stamper({'"p"': "k3"})
    stamp(err)
    assert "settings_hash" not in err
    other = ok_record(req({"id": "q", "prompt": "x"}), "a", "stop", 1, 1, "m")
    stamp(other)
    assert "settings_hash" not in other


def test_job_key_names_what_changed():
    fp = {"path": "/m", "digest": "d1", "parts": {"config.json": "a", "model.safetensors": "w"}}
    old = JobKey(fp, "checkpoint", {"max_tokens": 64, "temperature": 0.0, "stop": ()})
    fp2 = {"path": "/m", "digest": "d2", "parts": {"config.json": "b", "model.safetensors": "w", "x.json": "c"}}
    new = JobKey(fp2, "float32", {"max_tokens": 128, "temperature": 0.0, "stop": ()})
    assert old.differences(old.header()) == []  # a header compares equal to its own job after JSON
    what = new.differences(old.header())
    assert what == ["model fingerprint differs (config.json changed, x.json added)", "dtype checkpoint -> float32",
                    "max_tokens 64 -> 128"]
    assert old.request_key({"a": 1}) != new.request_key({"a": 1})  # the model and dtype are in every key
    assert old.request_key({"a": 1}) == JobKey(fp, "checkpoint", {}).request_key({"a": 1})  # defaults are not
    assert old.request_key({"a": 1}) != old.request_key({"a": 2})


def test_header_round_trip_and_garbage(tmp_path):
    out = tmp_path / "out.jsonl"
    assert read_header(out) is None
    h = JobKey({"path": "/m", "digest": "d", "parts": {}}, "checkpoint", {"max_tokens": 3}).header()
    write_header(out, h)
    assert read_header(out) == h and header_path_for(out).name == "out.jsonl.offbatch.json"
    assert not list(tmp_path.glob("*.offbatch-tmp"))
    header_path_for(out).write_text("[" * 100000)  # nested past the recursion limit: just no header
    assert read_header(out) is None


# ---- planning -----------------------------------------------------------------------------------

def write_lines(path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def want(*requests, key="K"):
    return {json.dumps(r.id): Wanted(r.line, r.input_hash, key) for r in requests}


def done_record(r, key="K", text="t"):
    rec = ok_record(r, text, "stop", 1, 1, "m")
    stamp_key(rec, key)
    return rec


JOB = JobKey({"path": "/m", "digest": "d", "parts": {}}, "checkpoint", {"max_tokens": 8})


def test_no_file_nothing_done(tmp_path):
    plan = plan_resume(tmp_path / "none.jsonl", want(req(PLAIN)))
    assert plan.done == set() and not plan.changed_any


def test_done_torn_and_truncate(tmp_path):
    a, b = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"})
    out = tmp_path / "out.jsonl"
    write_lines(out, [done_record(a)], tail=b'{"id": "b", "te')
    plan = plan_resume(out, want(a, b))
    assert plan.done == {'"a"'} and plan.torn and not plan.rewrite
    check_resume(out, plan, JOB, None)
    apply_resume(out, plan)
    assert out.read_bytes().endswith(b"\n") and len(out.read_text().splitlines()) == 1


def test_errors_changed_duplicates_dropped_stale_moved_aside(tmp_path):
    a, b, c = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"}), req(CHAT)
    old_b = req({"id": "b", "prompt": "old"})
    gone = req({"id": "gone", "prompt": "z"})
    out = tmp_path / "out.jsonl"
    recs = [
        done_record(a, text="1"),
        error_record(LineError(2, "e", "plain", "bad", "h")),
        done_record(old_b),  # b changed since
        done_record(a, text="1 again"),  # a second answer for a
        done_record(c),
        done_record(gone, text="4"),  # no longer in the job: moved aside, not deleted
    ]
    write_lines(out, recs)
    plan = plan_resume(out, want(a, b, c))
    check_resume(out, plan, JOB, None)
    assert plan.done == {'"a"', '"c"'} and plan.changed == ["b"]
    assert (plan.dropped_errors, plan.dropped_duplicates, len(plan.stale), plan.rewrite) == (1, 1, 1, True)
    stale = apply_resume(out, plan)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record_key(r)[0] for r in kept] == ['"a"', '"c"'] and kept[0]["text"] == "1"
    assert stale.name.startswith("out.jsonl.stale-") and stale.name.endswith("Z.jsonl")
    assert [json.loads(x)["text"] for x in stale.read_text().splitlines()] == ["4"]
    assert not (tmp_path / "out.jsonl.offbatch-tmp").exists()


def test_other_settings_are_refused_then_redone_or_kept(tmp_path):
    a, b, c = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"}), req({"id": "c", "prompt": "z"})
    out = tmp_path / "out.jsonl"
    old = ok_record(c, "no key", "stop", 1, 1, "m")  # an older offbatch wrote it
    write_lines(out, [done_record(a, key="OLD"), done_record(b, key="NEW"), old])
    before = out.read_bytes()
    wanted = want(a, b, c, key="NEW")
    old_job = JobKey(JOB.model, "checkpoint", {"max_tokens": 64})
    new_job = JobKey(JOB.model, "checkpoint", {"max_tokens": 128})
    plan = plan_resume(out, wanted)
    assert plan.settings_changed == ["a"] and plan.unknown == ["c"] and plan.done == {'"b"'}
    with pytest.raises(OutputFileError) as e:
        check_resume(out, plan, new_job, old_job.header())
    msg = str(e.value)
    assert "1 result(s) were made with other settings or another model (max_tokens 64 -> 128)" in msg
    assert '1 result(s) carry no settings key (written by an older offbatch: "c")' in msg
    assert "--redo-changed" in msg and "--keep-changed" in msg
    assert out.read_bytes() == before  # refused before anything was touched
    # --redo-changed: those are dropped (and redone by the run).
    check_resume(out, plan, new_job, old_job.header(), redo_changed=True)
    # --keep-changed: kept, and stamped with the current key so the next run takes them as they are.
    plan = plan_resume(out, wanted, keep_changed=True)
    check_resume(out, plan, new_job, old_job.header(), keep_changed=True)
    assert plan.done == {'"a"', '"b"', '"c"'}
    apply_resume(out, plan)
    assert [settings_key_of(r) for r in map(json.loads, out.read_text().splitlines())] == ["NEW"] * 3
    again = plan_resume(out, wanted)
    assert again.done == {'"a"', '"b"', '"c"'} and not again.mismatched and not again.rewrite


def test_a_line_that_now_fails_counts_as_changed(tmp_path):
    a = req({"id": "a", "prompt": "x"})
    out = tmp_path / "out.jsonl"
    write_lines(out, [done_record(a)])
    wanted = {'"a"': Wanted(1, a.input_hash, None, "the prompt has 70 tokens; the model's context is 64")}
    plan = plan_resume(out, wanted)
    with pytest.raises(OutputFileError, match=r'1 request\(s\) with a result now fail on their line \("a": the prompt'):
        check_resume(out, plan, JOB, JOB.header())


NOT_RESULTS = {
    "notes": (b"my notes\nmore notes\n", "2 line(s) of text that is not JSON (line 1: \"my notes\")"),
    "prompts": (b'{"prompt": "hi"}\n{"messages": []}\n', "2 request line(s) (it looks like a prompts file)"),
    "json": (b'{"a": 1}\n', "1 line(s) that are not result records (line 1:"),
    "notes_without_newline": (b"my notes", "1 line(s) of text that is not JSON"),  # not a torn line: not cut
    "brace_without_newline": (b"{draft", "1 line(s) of text that is not JSON"),  # nor is this
    "deep": (b"[" * 100000 + b"\n", "1 line(s) of text that is not JSON"),
}


@pytest.mark.parametrize("case", sorted(NOT_RESULTS))
def test_a_file_that_is_not_results_is_refused_and_overwrite_replaces_it(tmp_path, case):
    data, said = NOT_RESULTS[case]
    out = tmp_path / "out.jsonl"
    out.write_bytes(data)
    a = req({"id": "a", "prompt": "x"})
    plan = plan_resume(out, want(a))
    with pytest.raises(OutputFileError) as e:
        check_resume(out, plan, JOB, None)
    assert said in str(e.value) and "--overwrite" in str(e.value)
    plan = plan_resume(out, want(a), overwrite=True)
    check_resume(out, plan, JOB, None)
    apply_resume(out, plan)
    assert out.read_bytes() == b""


def test_another_jobs_results_are_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    write_lines(out, [done_record(req({"id": "x", "prompt": "x"})), done_record(req({"id": "y", "prompt": "y"}))])
    plan = plan_resume(out, want(req({"id": "a", "prompt": "x"})))
    with pytest.raises(OutputFileError, match=r"holds 2 result\(s\) of another job"):
        check_resume(out, plan, JOB, None)


def test_whole_last_record_without_newline_is_kept(tmp_path):
    a, b = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"})
    out = tmp_path / "out.jsonl"
    out.write_bytes(json.dumps(done_record(a)).encode() + b"\n" + json.dumps(done_record(b)).encode())
    plan = plan_resume(out, want(a, b))
    assert plan.done == {'"a"', '"b"'} and not plan.torn
    apply_resume(out, plan)
    assert out.read_bytes().endswith(b"}\n") and len(out.read_text().splitlines()) == 2


def test_overwrite_keeps_exactly_this_jobs_results(tmp_path):
    a, b = req({"id": "a", "prompt": "x"}), req({"id": "b", "prompt": "y"})
    out = tmp_path / "out.jsonl"
    write_lines(out, [done_record(a), done_record(b, key="OLD"), done_record(req({"id": "z", "prompt": "q"}))],
                tail=b"notes\n")
    plan = plan_resume(out, want(a, b), overwrite=True)
    check_resume(out, plan, JOB, None)
    assert plan.done == {'"a"'}
    assert apply_resume(out, plan) is None  # nothing moved aside: --overwrite replaces
    assert [record_key(json.loads(x))[0] for x in out.read_text().splitlines()] == ['"a"']


# ---- the writer ---------------------------------------------------------------------------------

def test_streams_and_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for stream in ["-", "/dev/null", "/dev/stdout", "/dev/stderr", "/dev/fd/1", "/proc/self/fd/1", str(fifo)]:
        assert is_stream(stream), stream
    assert not is_stream(tmp_path / "new.jsonl") and not is_stream(__file__)


def test_dev_null_is_written_without_fsync(monkeypatch):
    import offbatch.jobs.writer as writer

    monkeypatch.setattr(writer.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(22, "Invalid argument")))
    with ResultWriter("/dev/null", fsync_every=0) as w:
        w.write({"id": 1})
    assert w.count == 1


def test_full_disk_is_one_clear_error_counting_what_is_safe():
    w = ResultWriter("/dev/full", on_disk=5)  # a character device whose every write fails with ENOSPC
    with pytest.raises(OutputFileError) as e:
        w.write({"id": 1})
    assert "writing /dev/full failed: No space left on device" in str(e.value)
    with pytest.raises(OutputFileError):  # and every later write says the same
        w.write({"id": 2})
    w.close()  # reported once: close does not raise it again


def test_file_size_limit_is_an_error_not_a_kill(tmp_path):
    """RLIMIT_FSIZE for real in a child process: without SIGXFSZ ignored the child would die of the signal."""
    out = tmp_path / "out.jsonl"
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (150, 150))\n"
        "from offbatch.jobs.writer import ResultWriter\n"
        "from offbatch.errors import OutputFileError\n"
        f"w = ResultWriter({str(out)!r}, on_disk=0)\n"
        "try:\n"
        "    for i in range(10):\n"
        "        w.write({'id': i, 'text': 'x' * 40})\n"
        "except OutputFileError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 3, r.stderr
    assert "File too large" in r.stdout and "2 finished record(s) are safe" in r.stdout
    data = out.read_bytes()
    assert len(data) == 150 and data.count(b"\n") == 2  # two whole lines, then the torn one resume cuts


# ---- the lock -----------------------------------------------------------------------------------

def test_second_lock_fails_naming_the_holder(tmp_path):
    out = tmp_path / "out.jsonl"
    first = OutputLock(out).acquire()
    assert lock_path_for(out).read_text().strip() == str(os.getpid())
    with pytest.raises(OutputFileError, match=rf"in use by another offbatch run \(pid {os.getpid()}\)"):
        OutputLock(out).acquire()
    first.release()
    assert not lock_path_for(out).exists()
    lock_path_for(out).write_text("12345\n")  # left by a run killed with SIGKILL: nobody holds it
    with OutputLock(out) as again:
        assert again.held
    assert not lock_path_for(out).exists()


def test_lock_in_a_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFileError, match="lock file .* cannot be created"):
        OutputLock(tmp_path / "file" / "out.jsonl").acquire()  # a path under a file: ENOTDIR, root or not


# ---- the model fingerprint ----------------------------------------------------------------------

def test_fingerprint_samples_weights_and_names_changes(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text('{"a": 1}')
    (m / "README.md").write_text("words")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**18], "data_offsets": [0, 2**20]}}).encode()
    blob = len(header).to_bytes(8, "little") + header + bytes(2**20)
    (m / "model.safetensors").write_bytes(blob)
    os.mkfifo(m / "tokenizer.json")  # never opened: a FIFO would block
    fp = model_fingerprint(m)
    assert set(fp["parts"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert fp["parts"]["tokenizer.json"] == "not a regular file"
    (m / "README.md").write_text("other words")  # does not decide a result
    (m / "out.jsonl.offbatch.json").write_text("{}")  # nor does a job header kept in the folder
    assert model_fingerprint(m)["digest"] == fp["digest"]
    # A data byte at the end (the last sample) changes the fingerprint; so does config.json.
    (m / "model.safetensors").write_bytes(blob[:-1] + b"\x01")
    (m / "config.json").write_text('{"a": 2}')
    fp2 = model_fingerprint(m)
    assert describe_difference(fp, fp2) == "model fingerprint differs (config.json changed, model.safetensors changed)"
    assert describe_difference(fp2, model_fingerprint(m)) is None
    linked = tmp_path / "linked"  # another folder of the same files (as a Hugging Face cache links them)
    linked.mkdir()
    for f in m.iterdir():
        (linked / f.name).symlink_to(f)
    assert model_fingerprint(linked)["digest"] == fp2["digest"]


def test_stdin_that_is_the_output_file_is_recognised(tmp_path):
    """`run - -o p.jsonl < p.jsonl` with a real stdin: the runner sees both are one file (and refuses
    before reading anything more; the content check would refuse the prompts as results anyway)."""
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "x"}\n')
    code = "import sys; from offbatch.jobs.runner import _same_file; print(_same_file('-', sys.argv[1]), " \
           "_same_file('-', sys.argv[2]))"
    with open(p, "rb") as stdin:
        r = subprocess.run([sys.executable, "-c", code, str(p), __file__], stdin=stdin, capture_output=True,
                           text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.stdout.split() == ["True", "False"], r.stderr


def test_a_rewrite_that_cannot_finish_leaves_the_file_whole(tmp_path):
    """The cut-back rewrite under a real file-size limit (RLIMIT_FSIZE in a child): one clear error, the
    old file whole, no temporary file left."""
    a = req({"id": "a", "prompt": "x"})
    out = tmp_path / "out.jsonl"
    write_lines(out, [done_record(a, text="y" * 300), error_record(LineError(2, "e", "plain", "bad", "h"))])
    before = out.read_bytes()
    code = (
        "import json, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "from offbatch.jobs.ledger import RunOutput, Wanted, apply_resume, plan_resume\n"
        "from offbatch.errors import OutputFileError\n"
        "RunOutput(sys.argv[1])  # ignores SIGXFSZ, as a run does before it writes anything\n"
        "plan = plan_resume(sys.argv[1], {'\"a\"': Wanted(1, sys.argv[2], 'K')})\n"
        "assert plan.rewrite and plan.done == {'\"a\"'}\n"
        "try:\n"
        "    apply_resume(sys.argv[1], plan)\n"
        "except OutputFileError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out), a.input_hash], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 3, r.stderr
    assert "File too large; the file is left as it was" in r.stdout
    assert out.read_bytes() == before and not list(tmp_path.glob("*.offbatch-tmp"))
