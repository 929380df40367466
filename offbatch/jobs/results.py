"""Result records in both output shapes (the writer is jobs/writer.py).

Plain shape (for {"prompt"} / {"messages"} lines):
  {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "input_hash"}
  with logprobs asked for: "logprobs": [{"token", "id", "logprob", "top_logprobs": [{"token", "id", "logprob"}]}]
  with n > 1: "choices": [{"index", "text", "finish_reason", "completion_tokens"(, "logprobs")}]; the top-level
  text, finish_reason (and logprobs) are choice 0's and completion_tokens is the sum over the choices.
OpenAI Batch shape (for OpenAI batch lines), as the Batch API documents its output file:
  {"id": "batch_req_<input hash>", "custom_id", "error": null,
   "response": {"status_code": 200, "request_id", "body": <chat.completion | text_completion>}}
  The body's choices[i] carry index, message (chat) or text (completions), finish_reason and logprobs:
  null, or chat {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": null}, or completions {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"} (offsets into the returned text, in characters).
A request that fails (a bad line, or a generation that failed) has `error` {"code", "message", "line"}
(the API's {code, message}, plus our 1-based line number); in the OpenAI shape its response carries
status_code 400 (500 for a generation failure) and the API's error body. `error` is null exactly on
success: the ledger (ledger.py) relies on it. The input hash lets a rerun match a result to the exact
request content it answers; in the OpenAI shape it is the record's own id.

Log-probabilities are those of the model's raw logits (log-softmax before logit_bias, penalties and
temperature); a probability that underflows to zero is reported as -9999.0, as the OpenAI API does.
"""

from __future__ import annotations

import codecs
import math
import re
import time
from dataclasses import dataclass, field

OPENAI_ID_PREFIX = "batch_req_"
# Stable error codes (`error.code`); LineError.code picks one.
INVALID_REQUEST = "invalid_request"
UNSUPPORTED_FIELD = "unsupported_field"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
GENERATION_FAILED = "generation_failed"
ZERO_PROBABILITY = -9999.0  # what the OpenAI API reports for a log-probability of -inf


@dataclass
class TokenInfo:
    """One token of a completion, ready to print: its text, bytes and log-probability."""

    token: str
    id: int
    logprob: float
    bytes: list[int]
    top: list["TokenInfo"] = field(default_factory=list)  # the likeliest alternatives, likeliest first


@dataclass
class Choice:
    """One completion of a request (a request with n > 1 has n)."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenInfo] | None = None  # None: not asked for
    # Characters of the returned text each token starts at (the completions shape's text_offset).
    text_offsets: list[int] | None = None


# ---- token text and bytes -------------------------------------------------------------------------

def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes every byte as a printable character; this maps them back."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _gpt2_byte_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token adds to the text. A token can hold part of a UTF-8 character, which no
    string of its own can show: byte-level BPE (GPT-2, Llama-3, Qwen) and byte-fallback pieces
    (<0xE2>, SentencePiece) are mapped back to their bytes; other pieces are decoded."""
    backend = getattr(tokenizer, "backend", None)
    piece = backend.id_to_token(token_id) if backend is not None else None
    if piece is None:
        return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
    m = _BYTE_FALLBACK.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel" and all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    if "▁" in piece:  # SentencePiece's word boundary is a space
        return piece.replace("▁", " ").encode("utf-8")
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _is_special(tokenizer, token_id: int) -> bool:
    return tokenizer.decode([token_id], skip_special_tokens=True) == "" and \
        tokenizer.decode([token_id], skip_special_tokens=False) != ""


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else ZERO_PROBABILITY


def token_infos(tokenizer, logprobs, skip_special_tokens: bool = True) -> tuple[list[TokenInfo], list[int]]:
    """(TokenInfo per engine TokenLogprob, the character offset in the returned text where each token
    starts). Special tokens that the text leaves out (skip_special_tokens) take no characters."""
    cache: dict[int, tuple[str, bytes, bool]] = {}

    def text_of(token_id: int) -> tuple[str, bytes, bool]:
        if token_id not in cache:
            raw = token_bytes(tokenizer, token_id)
            cache[token_id] = (raw.decode("utf-8", errors="replace"), raw, _is_special(tokenizer, token_id))
        return cache[token_id]

    def info(token_id: int, logprob: float) -> TokenInfo:
        text, raw, _ = text_of(token_id)
        return TokenInfo(text, token_id, _finite(logprob), list(raw))

    infos, offsets = [], []
    chars = 0  # characters of the text the bytes so far have completed
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for lp in logprobs:
        entry = info(lp.token_id, lp.logprob)
        entry.top = [info(t, v) for t, v in lp.top]
        infos.append(entry)
        _, raw, special = text_of(lp.token_id)
        shown = not (skip_special_tokens and special)
        offsets.append(chars + (_unfinished_chars(decoder, raw) if shown else 0))
        if shown:
            chars += len(decoder.decode(raw))
    return infos, offsets


def _unfinished_chars(decoder, raw: bytes) -> int:
    """Characters that bytes held back by the decoder (an unfinished UTF-8 sequence) become before a
    token starting with `raw`: none when the token continues the character (the token starts inside
    it), else they are broken and each maximal piece becomes one U+FFFD, as in the decoded text."""
    pending = decoder.getstate()[0]
    if not pending or (raw and 0x80 <= raw[0] <= 0xBF):
        return 0
    return len(pending.decode("utf-8", errors="replace"))


# ---- records ----------------------------------------------------------------------------------------

def _plain_logprobs(infos: list[TokenInfo]) -> list[dict]:
    return [{"token": t.token, "id": t.id, "logprob": t.logprob,
             "top_logprobs": [{"token": a.token, "id": a.id, "logprob": a.logprob} for a in t.top]} for t in infos]


def _chat_logprobs(infos: list[TokenInfo]) -> dict:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": a.bytes} for a in t.top]}
                        for t in infos],
            "refusal": None}


def _completion_logprobs(infos: list[TokenInfo], offsets: list[int] | None) -> dict:
    if offsets is None:  # no text to measure against: the tokens' own lengths
        offsets, at = [], 0
        for t in infos:
            offsets.append(at)
            at += len(t.token)
    return {"tokens": [t.token for t in infos], "token_logprobs": [t.logprob for t in infos],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in infos], "text_offset": list(offsets)}


def _plain_record(req, choices: list[Choice], prompt_tokens: int) -> dict:
    first = choices[0]
    rec = {
        "id": req.id,
        "text": first.text,
        "finish_reason": first.finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": sum(c.completion_tokens for c in choices),
        "error": None,
        "input_hash": req.input_hash,
    }
    if first.logprobs is not None:
        rec["logprobs"] = _plain_logprobs(first.logprobs)
    if len(choices) > 1:
        rec["choices"] = []
        for i, c in enumerate(choices):
            entry = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
            if c.logprobs is not None:
                entry["logprobs"] = _plain_logprobs(c.logprobs)
            rec["choices"].append(entry)
    return rec


def _openai_choice(endpoint: str, i: int, c: Choice) -> dict:
    if endpoint == "chat":
        logprobs = _chat_logprobs(c.logprobs) if c.logprobs is not None else None
        return {"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                "finish_reason": c.finish_reason}
    logprobs = _completion_logprobs(c.logprobs, c.text_offsets) if c.logprobs is not None else None
    return {"index": i, "text": c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def completion_record(req, choices: list[Choice], prompt_tokens: int, model: str) -> dict:
    """The success record of a request: one choice, or n of them in index order."""
    if not choices:
        raise ValueError("a success record needs at least one choice")
    if req.shape == "plain":
        return _plain_record(req, choices, prompt_tokens)
    completion_tokens = sum(c.completion_tokens for c in choices)
    obj, prefix = ("chat.completion", "chatcmpl-") if req.endpoint == "chat" else ("text_completion", "cmpl-")
    body = {
        "id": prefix + req.input_hash,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [_openai_choice(req.endpoint, i, c) for i, c in enumerate(choices)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return {
        "id": OPENAI_ID_PREFIX + req.input_hash,
        "custom_id": req.id,
        "response": {"status_code": 200, "request_id": "req_" + req.input_hash, "body": body},
        "error": None,
    }


def ok_record(req, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, model: str) -> dict:
    """The success record of a request with one choice and no logprobs."""
    return completion_record(req, [Choice(text, finish_reason, completion_tokens)], prompt_tokens, model)


def error_record(err) -> dict:
    """A LineError (a bad line, or a request whose generation failed) as a record of its line's shape."""
    code = getattr(err, "code", None) or INVALID_REQUEST
    error = {"code": code, "message": err.message, "line": err.line}
    if err.shape == "plain":
        return {"id": err.id, "text": None, "finish_reason": None, "prompt_tokens": None, "completion_tokens": None,
                "error": error, "input_hash": err.input_hash}
    server_side = code == GENERATION_FAILED
    body = {"error": {"message": err.message, "type": "server_error" if server_side else "invalid_request_error",
                      "param": None, "code": code}}
    return {
        "id": OPENAI_ID_PREFIX + err.input_hash,
        "custom_id": err.id,
        "response": {"status_code": 500 if server_side else 400, "request_id": "req_" + err.input_hash, "body": body},
        "error": error,
    }


def result_text(record: dict) -> str | None:
    """The generated text (choice 0's) of a record of either shape; None for an error record."""
    if record.get("error") is not None:
        return None
    if "response" not in record:
        return record.get("text")
    choices = ((record.get("response") or {}).get("body") or {}).get("choices") or [{}]
    choice = choices[0]
    return (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
