"""Result records in both output shapes, and the writer that puts each on disk as it finishes.

Plain shape (for {"prompt"} / {"messages"} lines):
  {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "input_hash"}
OpenAI Batch shape (for OpenAI batch lines):
  {"id": "batch_req_<input hash>", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
`error` is null on success, else {"line", "message"}. The input hash lets a rerun match a result to
the exact request content it answers (see ledger.py); in the OpenAI shape it is the record's own id.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from offbatch.errors import InputFileError

OPENAI_ID_PREFIX = "batch_req_"


def ok_record(req, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, model: str) -> dict:
    if req.shape == "plain":
        return {
            "id": req.id,
            "text": text,
            "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "error": None,
            "input_hash": req.input_hash,
        }
    if req.endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj, prefix = "text_completion", "cmpl-"
    body = {
        "id": prefix + req.input_hash,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return {
        "id": OPENAI_ID_PREFIX + req.input_hash,
        "custom_id": req.id,
        "response": {"status_code": 200, "request_id": "req_" + req.input_hash, "body": body},
        "error": None,
    }


def error_record(err) -> dict:
    """A LineError as a record of its line's shape."""
    error = {"line": err.line, "message": err.message}
    if err.shape == "plain":
        return {"id": err.id, "text": None, "finish_reason": None, "prompt_tokens": None, "completion_tokens": None,
                "error": error, "input_hash": err.input_hash}
    body = {"error": {"message": err.message, "type": "invalid_request_error", "param": None, "code": None}}
    return {
        "id": OPENAI_ID_PREFIX + err.input_hash,
        "custom_id": err.id,
        "response": {"status_code": 400, "request_id": "req_" + err.input_hash, "body": body},
        "error": error,
    }


def result_text(record: dict) -> str | None:
    """The generated text of a record of either shape; None for an error record."""
    if "response" not in record:
        return record.get("text")
    choices = ((record.get("response") or {}).get("body") or {}).get("choices") or [{}]
    choice = choices[0]
    return choice["message"].get("content") if "message" in choice else choice.get("text")


class ResultWriter:
    """Appends one JSON line per record. Every record is flushed to the OS at once, so a crash of this
    process loses nothing written. fsync (which also survives a machine crash) runs on a write when
    `fsync_every` seconds have passed since the last one, from a background timer when results stop
    coming, and at close: thousands of short results do not each wait on the disk."""

    def __init__(self, path: str | Path, fsync_every: float = 1.0, truncate: bool = False):
        self.path = str(path)
        self.fsync_every = fsync_every
        self.count = 0
        if self.path == "-":
            self._file, self._owned = sys.stdout, False
        else:
            try:
                mode = "w" if truncate else "a"
                self._file, self._owned = open(self.path, mode, encoding="utf-8", newline="\n"), True
            except OSError as e:
                raise InputFileError(f"{self.path} cannot be written: {e.strerror or e}") from None
        self._lock = threading.Lock()
        self._dirty = False
        self._last_sync = time.monotonic()
        self._closed = threading.Event()
        self._timer = None
        if self._owned:
            self._timer = threading.Thread(target=self._sync_loop, name="offbatch-fsync", daemon=True)
            self._timer.start()

    def write(self, record: dict) -> None:
        # One write call per line, so a kill between records can only leave whole lines behind
        # (or, mid-write, one torn last line that the next run cuts off).
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self.count += 1
            self._dirty = True
            if time.monotonic() - self._last_sync >= self.fsync_every:
                self._sync_locked()

    def _sync_locked(self) -> None:
        if self._owned and self._dirty and not self._file.closed:
            os.fsync(self._file.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def _sync_loop(self) -> None:
        while not self._closed.wait(self.fsync_every):
            with self._lock:
                if self._dirty:
                    self._sync_locked()

    def sync(self) -> None:
        with self._lock:
            self._sync_locked()

    def close(self) -> None:
        self._closed.set()
        if self._timer is not None:
            self._timer.join()
            self._timer = None
        with self._lock:
            if self._file.closed:
                return
            self._file.flush()
            self._sync_locked()
            if self._owned:
                self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
