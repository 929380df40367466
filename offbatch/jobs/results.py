"""Result records in both output shapes (the writer is jobs/writer.py).

Plain shape (for {"prompt"} / {"messages"} lines):
  {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "input_hash"}
OpenAI Batch shape (for OpenAI batch lines):
  {"id": "batch_req_<input hash>", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}
`error` is null on success, else {"line", "message"}. The input hash lets a rerun match a result to
the exact request content it answers (see ledger.py); in the OpenAI shape it is the record's own id.
"""

from __future__ import annotations

import time

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
