"""JSONL request lines -> `Request`s, or `LineError`s for lines that cannot run.

Three shapes are accepted, freely mixed in one file:
  {"prompt": "...", ...sampling fields}                        plain completion
  {"messages": [{"role", "content"}, ...], ...sampling fields}  chat (the model's template is applied)
  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
                                                                 an OpenAI Batch API line
The id is `id` or `custom_id`, else the 1-based line number. A bad line never raises: it becomes a
LineError naming the line, the id (when it could be read) and the reason.

A line is read by `parse_json_line`, which cannot recurse or fail on any input: at most
MAX_LINE_BYTES bytes, at most MAX_DEPTH levels of nesting (checked by a flat scan before json.loads),
numbers a double or a 4300-digit integer can hold, no NaN/Infinity, no duplicate keys, and no lone
UTF-16 surrogate ("\ud800"): such a string is not Unicode text, so it could be neither tokenized nor
written out as UTF-8. Whatever it returns can be hashed, serialized and written without an error.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from offbatch.engine.api import SamplingParams
from offbatch.errors import InputFileError
from offbatch.jobs.params import (LINE_FIELDS, Defaults, ParamError, UnsupportedField, build_params, likely_name,
                                  read_fields, shown)
from offbatch.jobs.results import CONTEXT_LENGTH_EXCEEDED, INVALID_REQUEST, UNSUPPORTED_FIELD

OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
MAX_LINE_BYTES = 16 * 2**20  # 16 MiB: a million-token prompt fits, JSON escapes included
MAX_DEPTH = 64  # a request needs 6 levels (line, body, messages, message, content, part)
MAX_INT_DIGITS = 4300  # Python's own default limit for int(str); a longer number is an error, not a crash
PLAIN_FIELDS = ("id", "custom_id", "prompt", "messages")  # what a plain line holds besides LINE_FIELDS
OPENAI_FIELDS = ("custom_id", "id", "method", "url", "body")  # an OpenAI batch line's own fields
BODY_FIELDS = ("prompt", "messages")  # an OpenAI body's, besides LINE_FIELDS
ALL_NAMES = tuple(dict.fromkeys(LINE_FIELDS + PLAIN_FIELDS + OPENAI_FIELDS))


@dataclass
class Request:
    line: int
    id: str | int
    shape: str  # "plain" | "openai": which output shape its result takes
    endpoint: str  # "chat" | "completion"
    prompt: str | list[int] | None
    messages: list[dict] | None
    overrides: dict  # validated per-line sampling fields
    input_hash: str  # of the line's content: a rerun notices a request changed under the same id
    n: int = 1  # completions for this request (each its own seed stream)
    chat_template_kwargs: dict | None = None  # extra variables for the chat template (enable_thinking, ...)
    skip_special_tokens: bool = True  # drop special tokens from the returned text
    unknown_fields: list[tuple[str, str | None]] = field(default_factory=list)  # (field, likely intended name)
    model: str | None = None  # the model the line names (body.model): only compared with the one run
    # Filled in by prepare():
    prompt_ids: array = field(default_factory=lambda: array("l"))
    params: SamplingParams | None = None
    stop: tuple[str, ...] = ()


@dataclass
class LineError:
    line: int
    id: str | int
    shape: str
    message: str
    input_hash: str = ""
    endpoint: str = "completion"
    # The record's error.code (jobs/results.py): invalid_request, unsupported_field,
    # context_length_exceeded, generation_failed.
    code: str = "invalid_request"


def effective_settings(req: "Request") -> dict:
    """Everything besides the prompt that decides this request's result, after prepare(): what a
    resumed run compares (with the model's fingerprint) before it keeps an earlier result."""
    from dataclasses import asdict

    return {"params": asdict(req.params) if req.params is not None else None, "stop": list(req.stop), "n": req.n,
            "chat_template_kwargs": req.chat_template_kwargs, "skip_special_tokens": req.skip_special_tokens}


def content_hash(obj_or_bytes) -> str:
    if isinstance(obj_or_bytes, bytes):
        data = obj_or_bytes
    else:  # surrogatepass: a hash never fails (parse_json_line rejects lone surrogates before this)
        data = json.dumps(obj_or_bytes, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:24]


# ---- one line of JSON, safely --------------------------------------------------------------------

class _Unreadable(Exception):
    """Raised from inside json.loads' hooks: the line is JSON that offbatch will not take."""


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _too_deep(text: str, limit: int) -> bool:
    """Whether JSON text nests deeper than `limit`, by a flat scan (no recursion): brackets inside
    strings are removed first, then the depth is counted."""
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case, without copying the text
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _Unreadable(f"holds an integer of {len(digits.lstrip('-'))} digits (the limit is {MAX_INT_DIGITS})")
    try:
        return int(digits)
    except ValueError as e:  # a lower int_max_str_digits set for this interpreter
        raise _Unreadable(f"holds an integer too long to read ({e})") from None


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Unreadable(f"holds the number {text[:40]}, too large for a double")
    return value


def _constant(name: str):
    raise _Unreadable(f"holds {name}, which is not a JSON number")


def _object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Unreadable(f"has the key {json.dumps(dup, ensure_ascii=True)[:60]} twice in one object")
    return obj


def parse_json_line(raw: bytes) -> tuple[object, str | None]:
    """(value, None) for a line of JSON that offbatch can work with, else (None, why not). Never
    raises, whatever the bytes; see the module docstring for the limits."""
    value, _, why = _parse_json(raw)
    return value, why


def _parse_json(raw: bytes) -> tuple[object, str | None, str | None]:
    """(value, its canonical JSON text, None), or (None, None, why not)."""
    if len(raw) > MAX_LINE_BYTES:
        return None, None, (f"the line is {len(raw):,} bytes; the limit is {MAX_LINE_BYTES:,} "
                            f"({MAX_LINE_BYTES >> 20} MiB)")
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark: a file pasted onto the end of another
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    if _too_deep(text, MAX_DEPTH):
        return None, None, f"nested deeper than {MAX_DEPTH} levels"
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_int=_int, parse_float=_float,
                           parse_constant=_constant)
    except json.JSONDecodeError as e:
        return None, None, f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    except _Unreadable as e:
        return None, None, f"the line {e}"
    except RecursionError:  # unreachable after the scan; kept so that no line can ever crash a job
        return None, None, f"nested deeper than {MAX_DEPTH} levels"
    # Every string, keys included, is in the canonical text: one search finds a lone surrogate.
    canonical = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    lone = _SURROGATE.search(canonical)
    if lone:
        return None, None, (f"a string holds a lone surrogate (\\u{ord(lone.group()):04x}: invalid Unicode), "
                            "which can be neither tokenized nor written as UTF-8")
    return value, canonical, None


def read_input(path: str | Path) -> list[tuple[int, bytes]]:
    """(line number, raw bytes) of every non-blank line; '-' reads stdin. Only an unreadable file is
    fatal; undecodable bytes are left for parse_line to report on their own line."""
    try:
        if str(path) == "-":
            if sys.stdin is None:  # started with stdin closed (`<&-`)
                raise InputFileError("- reads the prompts from stdin, which is closed; pipe the prompts in "
                                     "or name the file")
            data = sys.stdin.buffer.read()
        else:
            data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path} is a folder, not a JSONL file") from None
    except OSError as e:
        raise InputFileError(f"{path} cannot be read: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
        data = data[3:]
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")):  # every line would fail alone; say why once
        raise InputFileError(f"{path} is UTF-16 (or UTF-32) text; offbatch reads UTF-8 JSONL: convert it, "
                             "e.g. iconv -f UTF-16 -t UTF-8")
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            lines.append((number, raw))
    return lines


def _id_of(obj: dict, line: int):
    for key in ("custom_id", "id"):
        value = obj.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ParamError(f"{key} must be a string or an integer, got {shown(value)}")
            return value
    return line


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text can go to a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = shown(part.get("type")) if isinstance(part, dict) else type(part).__name__
                raise ParamError(f"{where}: only text content parts are supported, got {kind}")
            if not isinstance(part.get("text"), str):
                raise ParamError(f"{where}: a text content part needs a string \"text\", got {shown(part.get('text'))}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ParamError(f"{where}: content must be a string or a list of text parts, got {shown(content)}")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ParamError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ParamError(f"messages[{i}] must be an object with a string role")
        if "content" not in m:
            raise ParamError(f"messages[{i}] has no content")
        out.append({**m, "content": _text_content(m["content"], f"messages[{i}]")})
    return out


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # the OpenAI completions API allows a list of prompts; one per line here
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)  # pre-tokenized prompt
    raise ParamError(f"prompt must be a string (or a list of token ids), got {shown(value)}")


def _request_fields(obj: dict, endpoint: str | None) -> tuple[str, str | list[int] | None, list | None]:
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if endpoint == "chat" and not has_messages:
        raise ParamError("a /v1/chat/completions body needs messages")
    if endpoint == "completion" and not has_prompt:
        raise ParamError("a /v1/completions body needs a prompt")
    if has_prompt and has_messages:
        raise ParamError("give either prompt or messages, not both")
    if has_messages:
        return "chat", None, _messages(obj["messages"])
    if has_prompt:
        return "completion", _prompt(obj["prompt"]), None
    raise ParamError("no prompt: a line needs \"prompt\", \"messages\" or an OpenAI batch \"body\"")


def _line_error(line: int, raw: bytes, why: str) -> LineError:
    return LineError(line, line, "plain", why, content_hash(raw))


def _openai_fields(obj: dict) -> list[tuple[str, str | None]]:
    """Unknown top-level fields of an OpenAI batch line; a request field there belongs in body."""
    unknown = []
    for k in obj:
        if k not in OPENAI_FIELDS:
            unknown.append((k, "body." + k if k in LINE_FIELDS or k in BODY_FIELDS else likely_name(k, ALL_NAMES)))
    return unknown


def parse_line(line: int, raw: bytes) -> Request | LineError:
    obj, canonical, why = _parse_json(raw)
    if why is not None:
        return _line_error(line, raw, why)
    if not isinstance(obj, dict):
        return _line_error(line, raw, f"a line must be a JSON object, got {type(obj).__name__}")
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:24]  # = content_hash(obj)
    shape = "openai" if ("body" in obj or "url" in obj) else "plain"
    try:
        rid = _id_of(obj, line)
    except ParamError as e:
        return LineError(line, line, shape, str(e), digest)
    endpoint = "completion"
    try:
        if shape == "openai":
            url = obj.get("url")
            if url not in OPENAI_URLS:
                raise ParamError(f"unknown url {shown(url)}: supported are {', '.join(OPENAI_URLS)}")
            endpoint = OPENAI_URLS[url]
            if obj.get("method", "POST") != "POST":
                raise ParamError(f"method must be POST, got {shown(obj.get('method'))}")
            body = obj.get("body")
            if not isinstance(body, dict):
                raise ParamError("body must be a JSON object")
            kind, prompt, messages = _request_fields(body, endpoint)
            fields = read_fields(body, kind, "chat" if kind == "chat" else "completion", BODY_FIELDS, ALL_NAMES)
            fields.unknown = _openai_fields(obj) + fields.unknown
        else:
            kind, prompt, messages = _request_fields(obj, None)
            endpoint = kind
            fields = read_fields(obj, kind, "chat" if kind == "chat" else "either", PLAIN_FIELDS, ALL_NAMES)
    except ParamError as e:
        code = UNSUPPORTED_FIELD if isinstance(e, UnsupportedField) else INVALID_REQUEST
        return LineError(line, rid, shape, str(e), digest, endpoint, code)
    return Request(line, rid, shape, endpoint, prompt, messages, fields.overrides, digest, n=fields.n,
                   chat_template_kwargs=fields.chat_template_kwargs, skip_special_tokens=fields.skip_special_tokens,
                   unknown_fields=fields.unknown, model=fields.model)


def prepare(req: Request, tokenizer, defaults: Defaults, context: int, vocab_size: int) -> LineError | None:
    """Tokenize the request and fix its sampling parameters; a LineError when it cannot run on this
    model (no chat template, template error, prompt too long, token ids out of range)."""

    def error(message: str, code: str = INVALID_REQUEST) -> LineError:
        return LineError(req.line, req.id, req.shape, message, req.input_hash, req.endpoint, code)

    try:
        if req.messages is not None:
            ids = tokenizer.encode_chat(req.messages, **(req.chat_template_kwargs or {}))
        elif isinstance(req.prompt, list):
            ids = req.prompt
        else:
            ids = tokenizer.encode(req.prompt)
        params, stop = build_params(defaults, req.overrides, req.id)
    except (ParamError, ValueError) as e:
        return error(str(e))
    except Exception as e:  # a model without a chat template, a template raising: only this line fails
        return error(str(e) or type(e).__name__)
    for where, tids in (("prompt", ids), ("stop_token_ids", params.stop_token_ids),
                        ("logit_bias", [t for t, _ in params.logit_bias])):
        bad = next((t for t in tids if not 0 <= t < vocab_size), None)
        if bad is not None:
            return error(f"{where}: token id {shown(bad)} is out of range for this model's vocabulary ({vocab_size})")
    if params.top_k >= vocab_size:
        params.top_k = 0  # every token is in the top k: the same as off, and no sampler sees k > vocab
    enders = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_token_ids))
    if params.min_tokens > 0 and len(enders) >= vocab_size:  # min_tokens bans them all: nothing is left to draw
        return error(f"min_tokens ({params.min_tokens}) cannot be honoured: stop_token_ids and eos cover the "
                     f"whole vocabulary ({vocab_size})")
    if not ids:
        return error("the prompt is empty (no tokens)")
    if len(ids) >= context:
        return error(
            f"the prompt has {len(ids)} tokens; the model's context is {context}, which leaves no room to generate",
            CONTEXT_LENGTH_EXCEEDED)
    if len(ids) + params.max_tokens > context:
        # Generation stops at the context edge with finish_reason "length", as it would anyway.
        params.max_tokens = context - len(ids)
        params.min_tokens = min(params.min_tokens, params.max_tokens)
    req.prompt_ids = array("l", ids)
    req.params, req.stop = params, stop
    return None


def _quoted(name: str) -> str:
    text = json.dumps(name)
    return text if len(text) <= 60 else text[:56] + '..."'


def _unknown_note(fields: list[tuple[str, str | None]]) -> str:
    return ", ".join(_quoted(k) + (f' (did you mean "{likely}"?)' if likely else "") for k, likely in fields)


def review_fields(requests: list[Request], strict: bool, model_name: str
                  ) -> tuple[list[Request], list[LineError], list[str]]:
    """(requests that run, error records, warnings) after a look at what the lines carry besides
    their request: one warning per distinct unknown field with its line count and likely name (with
    `strict`, those lines are error records instead), and one warning when lines name a model other
    than the one being run (batch files always carry a model name, so that is not an error)."""
    errors, notes = [], []
    if strict:
        for r in requests:
            if r.unknown_fields:
                errors.append(LineError(r.line, r.id, r.shape, f"unknown field {_unknown_note(r.unknown_fields)}; "
                                        "--strict makes unknown fields errors", r.input_hash, r.endpoint))
        failed = {e.line for e in errors}
        requests = [r for r in requests if r.line not in failed]
    else:
        counts = Counter(f for r in requests for f in dict.fromkeys(r.unknown_fields))
        for (name, likely), count in counts.items():
            guess = f' (did you mean "{likely}"?)' if likely else ""
            notes.append(f"unknown field {_quoted(name)} on {count} line(s){guess} - ignored")
    others = Counter(r.model for r in requests if r.model is not None and not _same_model(r.model, model_name))
    if others:
        named = ", ".join(f"{shown(m)} on {c}" for m, c in others.most_common(3)) + (", ..." if len(others) > 3 else "")
        notes.append(f"{sum(others.values())} line(s) name another model ({named}); this run uses {model_name}")
    return requests, errors, notes


def _same_model(named: str, model_name: str) -> bool:
    """A line's model names the folder being run: its name, or a hub id ending in it."""
    return named.rsplit("/", 1)[-1].casefold() == model_name.casefold()


def find_duplicates(requests: list[Request]) -> list[LineError]:
    """Later lines that reuse an earlier line's id become errors: results are matched to requests by
    id, so two requests under one id could not be told apart (nor resumed)."""
    first: dict[str, int] = {}
    errors = []
    for r in requests:
        key = json.dumps(r.id)
        if key in first:
            errors.append(
                LineError(r.line, r.id, r.shape, f"duplicate id {shown(r.id)} (first used on line {first[key]})",
                          r.input_hash, r.endpoint)
            )
        else:
            first[key] = r.line
    return errors
