"""JSONL request lines -> `Request`s, or `LineError`s for lines that cannot run.

Three shapes are accepted, freely mixed in one file:
  {"prompt": "...", ...sampling fields}                        plain completion
  {"messages": [{"role", "content"}, ...], ...sampling fields}  chat (the model's template is applied)
  {"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
                                                                 an OpenAI Batch API line
The id is `id` or `custom_id`, else the 1-based line number. A bad line never raises: it becomes a
LineError naming the line, the id (when it could be read) and the reason.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from offbatch.engine.api import SamplingParams
from offbatch.errors import InputFileError
from offbatch.jobs.params import Defaults, ParamError, build_params, line_overrides

OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


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


def effective_settings(req: "Request") -> dict:
    """Everything besides the prompt that decides this request's result, after prepare(): what a
    resumed run compares (with the model's fingerprint) before it keeps an earlier result."""
    from dataclasses import asdict

    return {"params": asdict(req.params) if req.params is not None else None, "stop": list(req.stop), "n": req.n,
            "chat_template_kwargs": req.chat_template_kwargs, "skip_special_tokens": req.skip_special_tokens}


def content_hash(obj_or_bytes) -> str:
    if isinstance(obj_or_bytes, bytes):
        data = obj_or_bytes
    else:
        data = json.dumps(obj_or_bytes, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:24]


def read_input(path: str | Path) -> list[tuple[int, bytes]]:
    """(line number, raw bytes) of every non-blank line; '-' reads stdin. Only an unreadable file is
    fatal; undecodable bytes are left for parse_line to report on their own line."""
    try:
        if str(path) == "-":
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
                raise ParamError(f"{key} must be a string or an integer, got {json.dumps(value)}")
            return value
    return line


def _text_content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; only text can go to a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ParamError(f"{where}: only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ParamError(f"{where}: content must be a string or a list of text parts, got {json.dumps(content)}")


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
    raise ParamError("prompt must be a string (or a list of token ids), got " + json.dumps(value)[:80])


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


def parse_line(line: int, raw: bytes) -> Request | LineError:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return LineError(line, line, "plain", "not UTF-8 text", content_hash(raw))
    except json.JSONDecodeError as e:
        return LineError(line, line, "plain", f"not valid JSON ({e.msg} at column {e.colno})", content_hash(raw))
    if not isinstance(obj, dict):
        return LineError(line, line, "plain", f"a line must be a JSON object, got {type(obj).__name__}", content_hash(raw))
    digest = content_hash(obj)
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
                raise ParamError(f"unknown url {json.dumps(url)}: supported are {', '.join(OPENAI_URLS)}")
            endpoint = OPENAI_URLS[url]
            if obj.get("method", "POST") != "POST":
                raise ParamError(f"method must be POST, got {json.dumps(obj.get('method'))}")
            body = obj.get("body")
            if not isinstance(body, dict):
                raise ParamError("body must be a JSON object")
            kind, prompt, messages = _request_fields(body, endpoint)
            overrides = line_overrides(body)
        else:
            kind, prompt, messages = _request_fields(obj, None)
            endpoint = kind
            overrides = line_overrides(obj)
    except ParamError as e:
        return LineError(line, rid, shape, str(e), digest, endpoint)
    return Request(line, rid, shape, endpoint, prompt, messages, overrides, digest)


def prepare(req: Request, tokenizer, defaults: Defaults, context: int, vocab_size: int) -> LineError | None:
    """Tokenize the request and fix its sampling parameters; a LineError when it cannot run on this
    model (no chat template, template error, prompt too long, token ids out of range)."""

    def error(message: str) -> LineError:
        return LineError(req.line, req.id, req.shape, message, req.input_hash, req.endpoint)

    try:
        if req.messages is not None:
            ids = tokenizer.encode_chat(req.messages)
        elif isinstance(req.prompt, list):
            ids = req.prompt
        else:
            ids = tokenizer.encode(req.prompt)
        params, stop = build_params(defaults, req.overrides, req.id)
    except (ParamError, ValueError) as e:
        return error(str(e))
    except Exception as e:  # a model without a chat template, a template raising: only this line fails
        return error(str(e) or type(e).__name__)
    bad = [t for t in list(ids) + list(params.stop_token_ids) if not 0 <= t < vocab_size]
    if bad:
        return error(f"token id {bad[0]} is out of range for this model's vocabulary ({vocab_size})")
    if not ids:
        return error("the prompt is empty (no tokens)")
    if len(ids) >= context:
        return error(
            f"the prompt has {len(ids)} tokens; the model's context is {context}, which leaves no room to generate"
        )
    if len(ids) + params.max_tokens > context:
        # Generation stops at the context edge with finish_reason "length", as it would anyway.
        params.max_tokens = context - len(ids)
        params.min_tokens = min(params.min_tokens, params.max_tokens)
    req.prompt_ids = array("l", ids)
    req.params, req.stop = params, stop
    return None


def find_duplicates(requests: list[Request]) -> list[LineError]:
    """Later lines that reuse an earlier line's id become errors: results are matched to requests by
    id, so two requests under one id could not be told apart (nor resumed)."""
    first: dict[str, int] = {}
    errors = []
    for r in requests:
        key = json.dumps(r.id)
        if key in first:
            errors.append(
                LineError(r.line, r.id, r.shape, f"duplicate id {json.dumps(r.id)} (first used on line {first[key]})",
                          r.input_hash, r.endpoint)
            )
        else:
            first[key] = r.line
    return errors
