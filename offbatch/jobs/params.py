"""Sampling parameters and the other request fields: validation of each, and the three layers they
come from.

generation_config.json (the model authors' choice) < command-line flags < fields on the line itself.
Every value is validated by the same function (`validate`) wherever it comes from, so a bad per-line
value becomes that line's error record and a bad flag a usage error.

Numeric limits keep the sampler's float32 arithmetic finite, whatever a line holds:
  temperature   0 .. 100; below 1e-5 it counts as 0, greedy (as in vLLM: dividing logits by a
                temperature that float32 rounds to 0 would give inf)
  top_p         (0, 1]; below 1e-8 it is raised to 1e-8 (the same nucleus: the likeliest token)
  min_p         0 .. 1
  repetition_penalty  0.01 .. 100 (1 is off)
  presence_penalty, frequency_penalty  -2 .. 2 (OpenAI's range)
  logit_bias    {token id: -100 .. 100}
  seed          a 64-bit integer
The catalogue of line fields (what runs, what is metadata, what cannot be honoured) is here too;
`read_fields` reads one line's (or OpenAI body's) fields in one pass.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field

from offbatch.engine.api import SamplingParams

BUILT_IN = {
    "max_tokens": 256,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": (),
    "stop_token_ids": (),
    "ignore_eos": False,
    "min_tokens": 0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": (),
    "logprobs": None,  # None: off; k: each token's log-probability and its k likeliest alternatives
}
FIELDS = tuple(BUILT_IN)

GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-8
PENALTY_RANGE = (-2.0, 2.0)
REPETITION_RANGE = (0.01, 100.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGPROBS = 5  # the completions form, `logprobs: k` (OpenAI's legacy limit)
MAX_TOP_LOGPROBS = 20  # the chat form, `logprobs: true, top_logprobs: k`
MAX_N = 128

# Variables a chat template gets from offbatch itself; chat_template_kwargs may not replace them.
TEMPLATE_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token",
                                "unk_token", "raise_exception", "tools", "documents"})

# ---- the catalogue of fields a request may carry -------------------------------------------------
# Sampling fields (max_completion_tokens is the OpenAI chat name for max_tokens); logprobs and
# top_logprobs are read together, by the line's shape.
SAMPLING_FIELDS = tuple(k for k in FIELDS if k != "logprobs") + ("max_completion_tokens",)
LOGPROB_FIELDS = ("logprobs", "top_logprobs")
REQUEST_FIELDS = ("n", "best_of", "chat_template_kwargs", "skip_special_tokens")
# Fields that do not change a result: accepted and ignored (model is compared with the run's model).
METADATA_FIELDS = ("model", "user", "metadata", "store", "service_tier", "parallel_tool_calls",
                   "safety_identifier", "prompt_cache_key")


def _never(v) -> bool:
    return False


# Fields offbatch cannot honour: (the values that mean "not used", why not). Any other value is an
# error record naming the field, never a silent run without it. null always counts as absent.
UNSUPPORTED = {
    "tools": (lambda v: v == [], "offbatch returns text; it does not call tools"),
    "tool_choice": (lambda v: v == "none", "offbatch returns text; it does not call tools"),
    "functions": (lambda v: v == [], "offbatch returns text; it does not call functions"),
    "function_call": (lambda v: v == "none", "offbatch returns text; it does not call functions"),
    "response_format": (lambda v: v == {"type": "text"}, 'only {"type": "text"}: structured output is not supported'),
    "guided_json": (_never, "structured output is not supported"),
    "guided_regex": (_never, "structured output is not supported"),
    "guided_choice": (_never, "structured output is not supported"),
    "guided_grammar": (_never, "structured output is not supported"),
    "structured_outputs": (_never, "structured output is not supported"),
    "stream": (lambda v: v is False, "a batch writes each result whole when it finishes; give stream: false"),
    "stream_options": (_never, "a batch does not stream"),
    "echo": (lambda v: v is False, "the prompt is not echoed; give echo: false"),
    "suffix": (lambda v: v == "", "insertion (text after the completion) is not supported"),
    "audio": (_never, "offbatch runs text models"),
    "modalities": (lambda v: v == ["text"], 'offbatch runs text models: only ["text"]'),
    "prediction": (_never, "predicted outputs are not supported"),
    "web_search_options": (_never, "offbatch has no web search"),
    "reasoning_effort": (_never, "use chat_template_kwargs (e.g. {\"enable_thinking\": false}) where the model's "
                                 "template has such a switch"),
    "use_beam_search": (lambda v: v is False, "beam search is not supported"),
    "prompt_logprobs": (_never, "log-probabilities of the prompt are not supported"),
    "include_stop_str_in_output": (lambda v: v is False, "the stop string is never part of the text"),
}

LINE_FIELDS = SAMPLING_FIELDS + LOGPROB_FIELDS + REQUEST_FIELDS + METADATA_FIELDS + tuple(UNSUPPORTED)


class ParamError(ValueError):
    """A request value out of type or range; the message names the field."""


class UnsupportedField(ParamError):
    """A field offbatch cannot honour (tools, response_format, stream: true, best_of != n, ...)."""


def shown(v) -> str:
    """A value as JSON for a message, cut to 80 characters; never raises."""
    try:
        text = json.dumps(list(v) if isinstance(v, (tuple, set)) else v)
    except (TypeError, ValueError):  # not JSON, or an integer too long to print
        text = f"<{type(v).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ParamError(f"{name} must be an integer, got {shown(v)}")
    return int(v)


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ParamError(f"{name} must be a number, got {shown(v)}")
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a double
        raise ParamError(f"{name} is out of range, got {shown(v)}") from None
    if not math.isfinite(f):
        raise ParamError(f"{name} must be a finite number, got {shown(v)}")
    return f


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ParamError(f"{name} must be true or false, got {shown(v)}")
    return v


def _check(ok: bool, name: str, v, rule: str):
    if not ok:
        raise ParamError(f"{name} must be {rule}, got {shown(v)}")
    return v


def _in(name: str, v: float, bounds: tuple[float, float], note: str = "") -> float:
    lo, hi = bounds
    return _check(lo <= v <= hi, name, v, f"in [{lo:g}, {hi:g}]{note}")


def _token_id(name: str, key) -> int:
    """A token id given as an integer or as a JSON object key (a string of digits)."""
    if isinstance(key, str):
        digits = key.strip()
        if not digits.isdigit() or not digits.isascii() or len(digits) > 18:
            raise ParamError(f"{name}: {shown(key)} is not a token id")
        return int(digits)
    tid = _integer(name, key)
    return _check(tid >= 0, name, tid, "a token id (>= 0)")


def _logit_bias(v) -> tuple[tuple[int, float], ...]:
    items = v.items() if isinstance(v, dict) else None
    if items is None:
        raise ParamError(f"logit_bias must be an object {{token id: bias}}, got {shown(v)}")
    out: dict[int, float] = {}
    for key, bias in items:
        tid = _token_id("logit_bias", key)
        if tid in out:
            raise ParamError(f"logit_bias names token {tid} twice")
        out[tid] = _in(f"logit_bias[{tid}]", _number(f"logit_bias[{tid}]", bias), LOGIT_BIAS_RANGE)
    return tuple(sorted(out.items()))


def _template_kwargs(v) -> dict:
    if not isinstance(v, dict):
        raise ParamError(f"chat_template_kwargs must be an object, got {shown(v)}")
    for key in v:
        if not isinstance(key, str) or not key.isidentifier():
            raise ParamError(f"chat_template_kwargs: {shown(key)} is not a template variable name")
        if key in TEMPLATE_VARIABLES:
            raise ParamError(f"chat_template_kwargs may not set {key!r}, which offbatch gives the template itself")
    return dict(v)


def validate(name: str, v):
    """The checked, normalised value of one request field, from a line or a flag (the name may be
    max_completion_tokens). logprobs here is either form: true/false or a count 0..5."""
    if name in ("max_tokens", "max_completion_tokens"):
        v = _integer(name, v)
        return _check(v >= 1, name, v, ">= 1")
    if name == "min_tokens":
        v = _integer(name, v)
        return _check(v >= 0, name, v, ">= 0")
    if name == "temperature":
        v = _number(name, v)
        _check(0 <= v <= MAX_TEMPERATURE, name, v, f"in [0, {MAX_TEMPERATURE:g}] (0 is greedy)")
        return 0.0 if v < GREEDY_BELOW else v
    if name == "top_p":
        v = _number(name, v)
        _check(0 < v <= 1, name, v, "in (0, 1]")
        return max(v, MIN_TOP_P)
    if name == "min_p":
        return _in(name, _number(name, v), (0.0, 1.0))
    if name == "top_k":
        v = _integer(name, v)
        return _check(v >= -1, name, v, ">= 0 (0 or -1: off)")
    if name == "repetition_penalty":
        return _in(name, _number(name, v), REPETITION_RANGE, " (1 is off)")
    if name in ("presence_penalty", "frequency_penalty"):
        return _in(name, _number(name, v), PENALTY_RANGE, " (0 is off)")
    if name == "logit_bias":
        return _logit_bias(v)
    if name == "seed":
        v = _integer(name, v)
        return _check(-(2**63) <= v < 2**64, name, v, "a 64-bit integer")
    if name in ("ignore_eos", "skip_special_tokens"):
        return _bool(name, v)
    if name == "stop":
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ParamError(f"stop must be a string or a list of strings, got {shown(v)}")
        if any(s == "" for s in stops):
            raise ParamError("stop strings must not be empty")
        return tuple(stops)
    if name == "stop_token_ids":
        if not isinstance(v, (list, tuple)):
            raise ParamError(f"stop_token_ids must be a list of token ids, got {shown(v)}")
        ids = tuple(_integer("stop_token_ids", t) for t in v)
        if any(t < 0 for t in ids):
            raise ParamError(f"stop_token_ids must be >= 0, got {list(ids)}")
        return ids
    if name == "logprobs":
        if isinstance(v, bool):
            return v
        v = _integer(name, v)
        return _check(0 <= v <= MAX_LOGPROBS, name, v, f"true, false or a count in [0, {MAX_LOGPROBS}]")
    if name == "top_logprobs":
        v = _integer(name, v)
        return _check(0 <= v <= MAX_TOP_LOGPROBS, name, v, f"in [0, {MAX_TOP_LOGPROBS}]")
    if name in ("n", "best_of"):
        v = _integer(name, v)
        return _check(1 <= v <= MAX_N, name, v, f"in [1, {MAX_N}]")
    if name == "chat_template_kwargs":
        return _template_kwargs(v)
    raise KeyError(name)


# ---- one line's fields ---------------------------------------------------------------------------

@dataclass
class LineFields:
    """What read_fields found on one request: its sampling overrides and request options."""

    overrides: dict  # validated sampling fields, by BUILT_IN name
    n: int = 1
    chat_template_kwargs: dict | None = None
    skip_special_tokens: bool = True
    model: str | None = None  # body.model / model: only compared with the model being run
    unknown: list[tuple[str, str | None]] = field(default_factory=list)  # (field, likely intended name)


def _logprobs(obj: dict, form: str) -> int | None:
    """SamplingParams.logprobs from the line's logprobs / top_logprobs. form: "chat" (logprobs true|false,
    top_logprobs 0..20), "completion" (logprobs: a count 0..5) or "either" (plain prompt lines)."""
    lp, top = obj.get("logprobs"), obj.get("top_logprobs")
    if lp is not None:
        lp = validate("logprobs", lp)
    if top is not None:
        top = validate("top_logprobs", top)
    if form == "chat" and lp is not None and not isinstance(lp, bool):
        raise ParamError(f"logprobs must be true or false for chat requests (the count goes in top_logprobs), got {lp}")
    if form == "completion" and isinstance(lp, bool):
        raise ParamError(f"logprobs must be a count in [0, {MAX_LOGPROBS}] for /v1/completions, got {json.dumps(lp)}")
    if form == "completion" and top is not None:
        raise ParamError("top_logprobs is a chat field; for /v1/completions give the count as logprobs")
    if isinstance(lp, bool) or lp is None:
        if top is not None and lp is not True:
            raise ParamError("top_logprobs needs logprobs: true")
        return (top or 0) if lp else None
    if top is not None:
        raise ParamError("give logprobs: true with top_logprobs, or logprobs as a count, not both")
    return lp


def likely_name(name: str, known) -> str | None:
    """The known field a misspelt one most likely means (temprature -> temperature), else None."""
    key = name.strip().lower().replace("-", "_")
    if key in known and key != name:
        return key
    close = difflib.get_close_matches(key, [k for k in known if k != name], n=1, cutoff=0.7)
    return close[0] if close else None


def read_fields(obj: dict, kind: str, logprobs_form: str, structural: tuple[str, ...] = (),
                all_names: tuple[str, ...] = ()) -> LineFields:
    """Validate every field of a line (or an OpenAI body) in one pass. kind: "chat" or "completion";
    structural: the names the caller reads itself (prompt, messages, id, ...); all_names: every
    name a line may use anywhere, for the likely-name guess of an unknown field. Raises ParamError."""
    for name, (harmless, why) in UNSUPPORTED.items():
        v = obj.get(name)
        if v is not None and not harmless(v):
            raise UnsupportedField(f"{name} is not supported ({why})")
    out = {}
    for name in SAMPLING_FIELDS:
        if obj.get(name) is not None:
            out[name] = validate(name, obj[name])
    if "max_completion_tokens" in out:  # the newer OpenAI name wins when both are given
        out["max_tokens"] = out.pop("max_completion_tokens")
    logprobs = _logprobs(obj, logprobs_form)
    if logprobs is not None:
        out["logprobs"] = logprobs
    found = LineFields(overrides=out)
    if obj.get("n") is not None:
        found.n = validate("n", obj["n"])
    if obj.get("best_of") is not None and validate("best_of", obj["best_of"]) != found.n:
        raise UnsupportedField(f"best_of is not supported (got {obj['best_of']} with n={found.n}); give n: each of the "
                         "n completions is returned")
    if obj.get("chat_template_kwargs") is not None:
        if kind != "chat":
            raise ParamError("chat_template_kwargs applies only to messages (chat) requests")
        found.chat_template_kwargs = validate("chat_template_kwargs", obj["chat_template_kwargs"])
    if obj.get("skip_special_tokens") is not None:
        found.skip_special_tokens = validate("skip_special_tokens", obj["skip_special_tokens"])
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise ParamError(f"model must be a string, got {shown(model)}")
    found.model = model
    known = set(LINE_FIELDS) | set(structural)
    names = set(LINE_FIELDS) | set(all_names)
    found.unknown = [(k, likely_name(k, names)) for k in obj if k not in known]
    return found


def line_overrides(obj: dict, kind: str = "completion", logprobs_form: str = "either") -> dict:
    """The validated sampling fields present on one request (null counts as absent, as in OpenAI)."""
    return read_fields(obj, kind, logprobs_form).overrides


@dataclass
class Defaults:
    """The command-wide sampling values and where each came from, for the run's opening line."""

    values: dict
    sources: dict
    base_seed: int = 0
    ignored: list[str] = field(default_factory=list)  # unusable generation_config entries, with why

    def describe(self) -> str:
        """'from flags: max_tokens=64; from generation_config.json: temperature=0.6; built-in: ...'"""
        always = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
        groups: dict[str, list[str]] = {}
        for k in FIELDS:
            source = self.sources[k]
            if source == "default" and k not in always:
                continue  # stop, penalties, ...: only worth a word when set
            value = self.base_seed if k == "seed" else self.values[k]
            if isinstance(value, tuple):
                value = list(value)
            label = {"flag": "from flags", "default": "built-in"}.get(source, "from " + source)
            groups.setdefault(label, []).append(f"{k}={value}")
        order = sorted(groups, key=lambda g: (g == "built-in", g != "from flags"))
        return "; ".join(f"{g}: {', '.join(groups[g])}" for g in order)


def resolve_defaults(generation_config: dict, flags: dict) -> Defaults:
    """Built-in values, replaced by generation_config's, replaced by the flags that were given (None: not
    given). Like `transformers.generate`, the config's temperature/top_p/top_k/min_p count only when it
    sets do_sample true; otherwise the model's authors asked for greedy decoding."""
    values = dict(BUILT_IN)
    sources = {k: "default" for k in values}
    ignored = []
    gen = dict(generation_config or {})
    if "max_new_tokens" in gen:
        gen["max_tokens"] = gen.pop("max_new_tokens")
    sampling_keys = ("temperature", "top_p", "top_k", "min_p")
    do_sample = gen.get("do_sample")
    for k in ("max_tokens", "repetition_penalty") + sampling_keys:
        if gen.get(k) is None:
            continue
        if k in sampling_keys and do_sample is not True:
            ignored.append(f"{k}={gen[k]} (do_sample is not true)")
            continue
        try:
            values[k] = validate(k, gen[k])
            sources[k] = "generation_config.json"
        except ParamError as e:
            ignored.append(str(e))
    if do_sample is False:
        sources["temperature"] = "generation_config.json (do_sample=false)"
    for k, v in flags.items():
        if v is None:
            continue
        if k not in BUILT_IN:
            raise KeyError(k)
        values[k] = validate(k, v)
        sources[k] = "flag"
    base_seed = values.pop("seed")
    values["seed"] = None
    return Defaults(values=values, sources=sources, base_seed=0 if base_seed is None else base_seed, ignored=ignored)


def request_seed(base_seed: int, request_id) -> int:
    """A request's own seed when its line sets none: fixed by the run's seed and the request id, so a
    rerun or a different batching repeats the same text, and different requests get different streams."""
    digest = hashlib.sha256(f"{base_seed}\0{json.dumps(request_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_params(defaults: Defaults, overrides: dict, request_id) -> tuple[SamplingParams, tuple[str, ...]]:
    """SamplingParams for one request, plus its stop strings (which the jobs layer checks itself)."""
    v = {**defaults.values, **overrides}
    if v["min_tokens"] > v["max_tokens"]:
        raise ParamError(f"min_tokens ({shown(v['min_tokens'])}) must not exceed max_tokens ({shown(v['max_tokens'])})")
    seed = v["seed"] if v["seed"] is not None else request_seed(defaults.base_seed, request_id)
    logprobs = v["logprobs"]
    if isinstance(logprobs, bool):  # a flag or default in the chat form: true = the chosen tokens only
        logprobs = 0 if logprobs else None
    params = SamplingParams(
        max_tokens=v["max_tokens"],
        temperature=v["temperature"],
        top_p=v["top_p"],
        top_k=max(v["top_k"], 0),
        min_p=v["min_p"],
        seed=seed,
        stop_token_ids=tuple(v["stop_token_ids"]),
        ignore_eos=v["ignore_eos"],
        min_tokens=v["min_tokens"],
        repetition_penalty=v["repetition_penalty"],
        presence_penalty=v["presence_penalty"],
        frequency_penalty=v["frequency_penalty"],
        logit_bias=tuple(v["logit_bias"]),
        logprobs=logprobs,
    )
    return params, tuple(v["stop"])
