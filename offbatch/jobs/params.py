"""Sampling parameters: validation of each field, and the three layers they come from.

generation_config.json (the model authors' choice) < command-line flags < fields on the line itself.
Every value is validated by the same function wherever it comes from, so a bad per-line value becomes
that line's error record and a bad flag a usage error.
"""

from __future__ import annotations

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
}
FIELDS = tuple(BUILT_IN)
# Names a line may use; max_completion_tokens is the OpenAI chat name for max_tokens.
LINE_FIELDS = FIELDS + ("max_completion_tokens",)


class ParamError(ValueError):
    """A sampling value out of type or range; the message names the field."""


def _integer(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ParamError(f"{name} must be an integer, got {json.dumps(v)}")
    return int(v)


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ParamError(f"{name} must be a number, got {json.dumps(v)}")
    return float(v)


def _check(ok: bool, name: str, v, rule: str):
    if not ok:
        raise ParamError(f"{name} must be {rule}, got {v}")
    return v


def validate(name: str, v):
    """The checked, normalised value of one sampling field (the name may be max_completion_tokens)."""
    if name in ("max_tokens", "max_completion_tokens"):
        v = _integer(name, v)
        return _check(v >= 1, name, v, ">= 1")
    if name == "min_tokens":
        v = _integer(name, v)
        return _check(v >= 0, name, v, ">= 0")
    if name == "temperature":
        v = _number(name, v)
        return _check(v >= 0, name, v, ">= 0 (0 is greedy)")
    if name == "top_p":
        v = _number(name, v)
        return _check(0 < v <= 1, name, v, "in (0, 1]")
    if name == "min_p":
        v = _number(name, v)
        return _check(0 <= v <= 1, name, v, "in [0, 1]")
    if name == "top_k":
        v = _integer(name, v)
        return _check(v >= -1, name, v, ">= 0 (0 or -1: off)")
    if name == "repetition_penalty":
        v = _number(name, v)
        return _check(v > 0, name, v, "> 0 (1 is off)")
    if name == "seed":
        v = _integer(name, v)
        return _check(-(2**63) <= v < 2**64, name, v, "a 64-bit integer")
    if name == "ignore_eos":
        if not isinstance(v, bool):
            raise ParamError(f"ignore_eos must be true or false, got {json.dumps(v)}")
        return v
    if name == "stop":
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ParamError(f"stop must be a string or a list of strings, got {json.dumps(v)}")
        if any(s == "" for s in stops):
            raise ParamError("stop strings must not be empty")
        return tuple(stops)
    if name == "stop_token_ids":
        if not isinstance(v, (list, tuple)):
            raise ParamError(f"stop_token_ids must be a list of token ids, got {json.dumps(v)}")
        ids = tuple(_integer("stop_token_ids", t) for t in v)
        if any(t < 0 for t in ids):
            raise ParamError(f"stop_token_ids must be >= 0, got {list(ids)}")
        return ids
    raise KeyError(name)


def line_overrides(obj: dict) -> dict:
    """The validated sampling fields present on one request (null counts as absent, as in OpenAI)."""
    out = {}
    for name in LINE_FIELDS:
        if obj.get(name) is not None:
            out[name] = validate(name, obj[name])
    if "max_completion_tokens" in out:  # the newer OpenAI name wins when both are given
        out["max_tokens"] = out.pop("max_completion_tokens")
    if obj.get("n") is not None and obj["n"] != 1:
        raise ParamError(f"n must be 1 (one completion per line), got {json.dumps(obj['n'])}")
    return out


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
                continue  # stop, stop_token_ids, ignore_eos, min_tokens: only worth a word when set
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
        raise ParamError(f"min_tokens ({v['min_tokens']}) must not exceed max_tokens ({v['max_tokens']})")
    seed = v["seed"] if v["seed"] is not None else request_seed(defaults.base_seed, request_id)
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
    )
    return params, tuple(v["stop"])
