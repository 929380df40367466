"""Plan: what the streaming engine runs - its backends and formats, placement and batch sizes - and
saving and loading it as JSON. The planner (offbatch/planner) makes one; the engine reads it. It sits
below both: a plan names backends and formats by their registered names and knows nothing of them."""

from __future__ import annotations

import math
import re
import stat
from dataclasses import dataclass, field

import torch

from offbatch.errors import PlanFileError
from offbatch.models.catalogue import ModuleKey
from offbatch.units import MAX_BYTES, format_bytes

SCORE_BYTES = 256 << 20  # attention scores of one prefill micro-batch (bounds its sequence count)
# Rows x vocabulary the sampler works on at once (engine/sampler.py): its copies take about 30 bytes an
# entry, which for a wave of 1 024 sequences over a 128k vocabulary would be 4 GB on a GPU capped at 8 GiB.
SAMPLE_CHUNK_ENTRIES = 1 << 22

# 2: the attention backend by name (`attention`) replaced format 1's kv_placement/decode_attention pair;
# the weight format, KV format and MoE FFN backend are named too.
PLAN_FORMAT = 2


@dataclass
class Plan:
    device: str
    dtype: torch.dtype
    wave_size: int  # KV slots: sequences decoded together
    max_len: int  # context per sequence (prompt + generated)
    prefill_tokens: int  # prompt tokens admitted per step
    attn_micro_batch: int  # sequences per attention call (prefill calls also bounded by score_bytes)
    ffn_micro_tokens: int  # tokens per FFN / expert call
    slots: dict[str, int] = field(default_factory=dict)
    resident: set[ModuleKey] = field(default_factory=set)
    score_bytes: int = SCORE_BYTES
    attention: str = "device-kv"  # the attention backend (offbatch.attention): where KV lives, where decode attends
    weights: str = "dense"  # the weight format (offbatch.formats)
    kv_format: str = "dense"  # how K/V are stored (offload.kv)
    hgca: str = ""  # with the "hgca" attention backend: its setting ("sinks=4,window=256,top_k=128")
    moe_ffn: str = ""  # the FFN backend of MoE layers (offbatch.ffn); "" for a dense model (or: chosen at run time)
    # The FFN backend of dense layers: "dense", or "hybrid" (hot neurons resident, cold ones on the host
    # threads, steps of at most hybrid_tokens tokens; larger steps stream the FFN modules dense).
    dense_ffn: str = "dense"
    hot_neurons: int = 0  # per hybrid layer
    hybrid_tokens: int = 0
    # Hybrid steps of at least this many tokens (0: none) fetch the union of their active cold neurons to the
    # GPU (rows read from pinned host memory) and multiply it there, in place of the host threads.
    hybrid_fetch_tokens: int = 0
    budget_bytes: int | None = None
    memory: dict[str, int] = field(default_factory=dict)  # device bytes by use
    host_memory: dict[str, int] = field(default_factory=dict)  # host bytes by use
    predicted: dict = field(default_factory=dict)  # the cost model's figures (planner.solve.predict)
    hardware: str = ""  # the hardware profile the plan was made for
    chosen_by: str = "rules"  # "solver", "rules" or "file"
    # The disk tier: modules left in the checkpoint (not in pinned host memory), read at each use through
    # `staging_buffers` pinned buffers; empty when the weights fit the host budget.
    disk: set[ModuleKey] = field(default_factory=set)
    staging_buffers: int = 2
    residency_order: str = "layer"  # how `resident` was picked (planner.residency.RESIDENCY_ORDERS)
    # The solver's rival backend predicted within its tie tolerance (planner.solve.Solver.near_tie):
    # the knobs, its figure and a sentence; None when the choice was clear.
    near_tie: dict | None = None
    # GPUs of one host that split the weight stream (offload/shard_group.py, `run --split-stream`): the plan
    # is each one's (its share of the sequences and of host memory; 1/split of the weight bytes over its link).
    split_stream: int = 1

    def describe(self) -> dict:
        return {
            "device": self.device, "dtype": str(self.dtype).replace("torch.", ""), "wave_size": self.wave_size,
            "max_len": self.max_len, "prefill_tokens": self.prefill_tokens,
            "attn_micro_batch": self.attn_micro_batch, "ffn_micro_tokens": self.ffn_micro_tokens,
            "slots": self.slots, "resident_modules": len(self.resident), "budget_bytes": self.budget_bytes,
            "memory": self.memory, "attention": self.attention, "weights": self.weights, "kv_format": self.kv_format,
            "hgca": self.hgca, "moe_ffn": self.moe_ffn, "dense_ffn": self.dense_ffn, "hot_neurons": self.hot_neurons,
            "hybrid_tokens": self.hybrid_tokens, "hybrid_fetch_tokens": self.hybrid_fetch_tokens,
            "host_memory": self.host_memory, "hardware": self.hardware, "chosen_by": self.chosen_by,
            "disk_modules": len(self.disk), "staging_buffers": self.staging_buffers, "predicted": self.predicted,
            "residency_order": self.residency_order, "near_tie": self.near_tie, "split_stream": self.split_stream,
        }

    def summary(self) -> str:
        """One line for a job's log: where things are, the batch sizes, what the model expects, and why."""
        from offbatch.attention import ATTENTION_BACKENDS

        gpu = "GPU" if self.device.startswith("cuda") else "compute device (CPU)"
        backend = ATTENTION_BACKENDS.get(self.attention)
        kv = backend.summary_words(gpu) if backend is not None else f"attention {self.attention}"
        if self.kv_format != "dense":
            kv += f", {self.kv_format} KV"
        if self.hgca:
            kv += f" ({self.hgca})"
        if self.dense_ffn == "hybrid":
            kv += (f", hybrid FFN ({self.hot_neurons} hot neurons per streamed layer on the {gpu.split()[0]}, cold ones "
                   f"{cold_path_words(self.hybrid_tokens, self.hybrid_fetch_tokens)})")
        mem = self.memory or {}
        parts = [f"plan ({'from file' if self.chosen_by == 'file' else self.chosen_by}): {kv}, wave {self.wave_size}, "
                 f"prefill {self.prefill_tokens} tok/step, attention mb {self.attn_micro_batch}, FFN mb {self.ffn_micro_tokens}"]
        if mem:
            spread = ", spread over the step" if self.residency_order == "spread" else ""
            parts.append(f"{gpu.split()[0]} {format_bytes(sum(mem.values()))} ({format_bytes(mem.get('resident_weights', 0))} "
                         f"resident weights{spread}{f', {len(self.disk)} modules on disk' if self.disk else ''})")
        pred = self.predicted or {}
        n = self.split_stream
        if n > 1:
            parts.insert(0, f"weight stream split over {n} GPUs (each copies 1/{n} of every streamed module, runs 1/{n} "
                            "of the prompts, and this plan)")
        if pred.get("e2e_tok_s"):
            per_gpu = f" ({n} x {pred['e2e_tok_s']:,.0f} per GPU)" if n > 1 else ""
            parts.append(f"predicted {n * pred['e2e_tok_s']:,.0f} tok/s end to end{per_gpu} (decode "
                         f"{n * pred['decode_tok_s']:,.0f}, prefill {n * pred['prefill_tok_s']:,.0f})")
        line = "; ".join(parts)
        if pred.get("bottleneck"):
            line += f"\n  bottleneck: {pred['bottleneck']}"
        if self.near_tie:
            line += f"\n  near-tie: {self.near_tie['words']}"
        return line

    # ---- a plan file (`offbatch plan --json` writes one; `--plan FILE` pins it) ----------------------
    def to_dict(self) -> dict:
        d = self.describe()
        d["format"] = PLAN_FORMAT
        d["score_bytes"] = self.score_bytes
        d["resident"] = sorted([list(k) for k in self.resident])
        d["disk"] = sorted([list(k) for k in self.disk])
        return d

    @staticmethod
    def from_dict(d: dict) -> "Plan":
        """A plan from its JSON form (a plan file), every field checked for its type and range in one
        pass: a PlanFileError naming the first field that is wrong, never an exception from deeper in."""
        if isinstance(d, dict) and isinstance(d.get("plan"), dict):
            d = d["plan"]  # a whole `offbatch plan --json` report
        if not isinstance(d, dict):
            raise PlanFileError(f"not a plan file: a JSON object is expected, not {_json_type(d)}; {_WRITE_ONE}")
        if "format" not in d:
            raise PlanFileError(f"not a plan file: it has no \"format\" field; {_WRITE_ONE}")
        if d["format"] != PLAN_FORMAT or isinstance(d["format"], bool):
            older = (" (an older offbatch's plan: it names kv_placement and decode_attention where plans now name "
                     "an attention backend)") if d["format"] == 1 and not isinstance(d["format"], bool) else ""
            raise PlanFileError(f"plan file format {_shown(d['format'])}{older}: this offbatch reads format "
                                f"{PLAN_FORMAT}; make the plan again with `offbatch plan ... --json`")
        plan = Plan(
            device=_device(d), dtype=_dtype(d),
            wave_size=_whole(d, "wave_size", 1, MAX_PLAN_WAVE), max_len=_whole(d, "max_len", 2, MAX_PLAN_CONTEXT),
            prefill_tokens=_whole(d, "prefill_tokens", 1, MAX_PLAN_TOKENS),
            attn_micro_batch=_whole(d, "attn_micro_batch", 1, MAX_PLAN_WAVE),
            ffn_micro_tokens=_whole(d, "ffn_micro_tokens", 1, MAX_PLAN_TOKENS),
            slots=_counts(d, "slots", MAX_PLAN_SLOTS), resident=_modules(d, "resident"),
            score_bytes=_whole(d, "score_bytes", 1 << 10, MAX_BYTES, SCORE_BYTES),
            **_backends(d),
            hot_neurons=_whole(d, "hot_neurons", 0, 1 << 24, 0), hybrid_tokens=_whole(d, "hybrid_tokens", 0, MAX_PLAN_TOKENS, 0),
            hybrid_fetch_tokens=_whole(d, "hybrid_fetch_tokens", 0, MAX_PLAN_TOKENS, 0),
            budget_bytes=_whole(d, "budget_bytes", 1, MAX_BYTES, None),
            memory=_counts(d, "memory", MAX_BYTES, {}), host_memory=_counts(d, "host_memory", MAX_BYTES, {}),
            predicted=_predicted(d), hardware=_text(d, "hardware", ""), chosen_by="file",
            disk=_modules(d, "disk", set()), staging_buffers=_whole(d, "staging_buffers", 1, MAX_PLAN_SLOTS, 2),
            split_stream=_whole(d, "split_stream", 1, 1024, 1),
            residency_order=_choice(d, "residency_order", ("layer", "spread"), "layer"),
        )
        if plan.attn_micro_batch > plan.wave_size:
            raise PlanFileError(f"a plan's attn_micro_batch ({plan.attn_micro_batch}) is at most its wave_size "
                                f"({plan.wave_size})")
        return plan


# ---- checking a plan file's fields (Plan.from_dict) ------------------------------------------------------
# What a plan file may hold: what the solver chooses, with room for hand edits; beyond these the engine
# would allocate without bound (an absurd max_len or wave) or the value is a typo.
MAX_PLAN_WAVE = 1 << 16  # sequences (the solver's largest wave is 4096)
MAX_PLAN_CONTEXT = 1 << 21  # tokens: above every model's context (the engine checks the model's own)
MAX_PLAN_TOKENS = 1 << 24  # tokens per prefill step or FFN call
MAX_PLAN_SLOTS = 64  # device slots per module kind, staging buffers (the solver uses 1 to 3)
_WRITE_ONE = "write one with `offbatch plan ... --json`"
_MISSING = object()


def cold_path_words(hybrid_tokens: int, fetch_tokens: int) -> str:
    """Where a hybrid plan computes its cold neurons, in words."""
    if fetch_tokens and fetch_tokens <= 1:
        return f"fetched to the GPU in steps of at most {hybrid_tokens} tokens"
    if fetch_tokens:
        return (f"on the host threads in steps of fewer than {fetch_tokens} tokens, fetched to the GPU in steps of "
                f"{fetch_tokens} to {hybrid_tokens}")
    return f"on the host threads in steps of at most {hybrid_tokens} tokens"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:30] + "...(cut)"


def _json_type(value) -> str:
    for kind, name in ((bool, "true/false"), (int, "a number"), (float, "a number"), (str, "a string"),
                       (list, "a list"), (dict, "an object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _field(d: dict, name: str, default):
    if name in d:
        return d[name]
    if default is _MISSING:
        raise PlanFileError(f"not a plan file: it has no \"{name}\"; {_WRITE_ONE}")
    return default


def _as_whole(value, what: str, lo: int, hi: int) -> int:
    # JSON has one number type: 12.0 is a whole number, 1e12 one too large, 1.5 and "12" are not numbers
    # of tokens at all.
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        kind = "" if isinstance(value, float) else f" ({_json_type(value)})"
        raise PlanFileError(f"a plan's {what} is a whole number, not {_shown(value)}{kind}")
    if not lo <= value <= hi:
        raise PlanFileError(f"a plan's {what} is {lo} to {hi}, not {_shown(value)}")
    return value


def _whole(d: dict, name: str, lo: int, hi: int, default=_MISSING):
    if name not in d and default is not _MISSING:
        return default
    value = _field(d, name, default)
    return None if value is None and default is None else _as_whole(value, name, lo, hi)


def _choice(d: dict, name: str, options: tuple[str, ...], default: str) -> str:
    value = _field(d, name, default)
    if value not in options or not isinstance(value, str):
        shown = " or ".join(o or '""' for o in options)  # "": none (a plan's moe_ffn for a dense model)
        raise PlanFileError(f"a plan's {name} is {shown}, not {_shown(value)}")
    return value


def _backends(d: dict) -> dict[str, str]:
    """The backends and formats a plan names, each one registered here (a plan made by an offbatch with
    more of them, or a typo, is one clear error)."""
    from offbatch.attention import attention_names
    from offbatch.ffn import FFN_BACKENDS

    moe = [""] + sorted(n for n, c in FFN_BACKENDS.items() if c.moe)
    return {"attention": _choice(d, "attention", tuple(attention_names()), "device-kv"),
            "weights": _format_name(d),
            "kv_format": _kv_format(d),
            "hgca": _hgca(d),
            "moe_ffn": _choice(d, "moe_ffn", tuple(moe), ""),
            "dense_ffn": _choice(d, "dense_ffn", ("dense", "hybrid"), "dense")}


def _kv_format(d: dict) -> str:
    from offbatch.offload.kv import kv_format_name

    value = _field(d, "kv_format", "dense")
    if not isinstance(value, str):
        raise PlanFileError(f"a plan's kv_format is a KV format (dense, int8, int4, int4-g16, ...), not {_shown(value)}")
    try:
        return kv_format_name(value)
    except KeyError:
        raise PlanFileError(f"a plan's kv_format is a KV format (dense, int8, int4, int4-g16, ...), not "
                            f"{_shown(value)}") from None


def _hgca(d: dict) -> str:
    from offbatch.attention.hgca_setting import HGCASetting

    value = _field(d, "hgca", "")
    if value == "":
        if d.get("attention") == "hgca":
            raise PlanFileError("a plan with the hgca attention backend names its setting in \"hgca\" "
                                "(e.g. \"sinks=4,window=256,top_k=128\")")
        return ""
    if not isinstance(value, str):
        raise PlanFileError(f"a plan's hgca is a setting like \"sinks=4,window=256,top_k=128\", not {_shown(value)}")
    try:
        return str(HGCASetting.parse(value))
    except ValueError as e:
        raise PlanFileError(f"a plan's hgca: {e}") from None


def _format_name(d: dict) -> str:
    from offbatch.formats import format_names, known_format

    value = _field(d, "weights", "dense")
    if not known_format(value):
        raise PlanFileError(f"a plan's weights is a weight format ({format_names()}), not {_shown(value)}")
    return value


def _text(d: dict, name: str, default: str) -> str:
    value = _field(d, name, default)
    if not isinstance(value, str) or len(value) > 200:
        raise PlanFileError(f"a plan's {name} is a short string, not {_shown(value)}")
    return value


def _device(d: dict) -> str:
    value = _field(d, "device", _MISSING)
    if not isinstance(value, str) or re.fullmatch(r"cpu|cuda(:[0-9]{1,3})?", value) is None:
        raise PlanFileError(f"a plan's device is cpu, cuda or cuda:N, not {_shown(value)}")
    return value


def _dtype(d: dict) -> torch.dtype:
    value = _field(d, "dtype", _MISSING)
    if value not in ("float32", "float16", "bfloat16") or not isinstance(value, str):
        raise PlanFileError(f"a plan's dtype is float32, float16 or bfloat16, not {_shown(value)}")
    return getattr(torch, value)


def _counts(d: dict, name: str, hi: int, default=_MISSING) -> dict[str, int]:
    value = _field(d, name, default)
    if not isinstance(value, dict):
        raise PlanFileError(f"a plan's {name} is an object of counts, not {_json_type(value)}")
    return {str(k): _as_whole(v, f"{name}[{_shown(k)}]", 0, hi) for k, v in value.items()}


def _modules(d: dict, name: str, default=_MISSING) -> set[ModuleKey]:
    if name not in d and default is not _MISSING:
        return set(default)
    value = _field(d, name, default)
    if not isinstance(value, list):
        raise PlanFileError(f"a plan's {name} is a list of [layer, module] pairs, not {_json_type(value)}")
    out = set()
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], str) and len(item[1]) <= 64):
            raise PlanFileError(f"a plan's {name} holds [layer, module] pairs, not {_shown(item)}")
        out.add((_as_whole(item[0], f"{name} layer", -1, 1 << 20), item[1]))
    return out


def _predicted(d: dict) -> dict:
    """The cost model's figures saved with the plan: shown in a run's log, never used to run."""
    value = _field(d, "predicted", {})
    if not isinstance(value, dict):
        raise PlanFileError(f"a plan's predicted is an object, not {_json_type(value)}")
    for key in ("e2e_tok_s", "decode_tok_s", "prefill_tok_s"):
        x = value.get(key, 0.0)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise PlanFileError(f"a plan's predicted {key} is a number, not {_shown(x)}")
    if not isinstance(value.get("bottleneck", ""), str):
        raise PlanFileError("a plan's predicted bottleneck is a string")
    return dict(value)


MAX_PLAN_FILE_BYTES = 64 << 20  # a plan of a 1000-layer MoE is a few MiB


def load_plan_file(path) -> Plan:
    """A plan saved by `offbatch plan --json` (the whole report or its "plan"), or one clear PlanFileError
    naming the file: unreadable, not a regular file, too large, not JSON (or nested past the parser),
    or a plan whose fields are wrong."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read, a directory cannot be read
            raise PlanFileError(f"the plan file {path} is not a regular file")
        if st.st_size > MAX_PLAN_FILE_BYTES:
            raise PlanFileError(f"the plan file {path} is {format_bytes(st.st_size)}; a plan file is at most "
                                f"{format_bytes(MAX_PLAN_FILE_BYTES)}")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise PlanFileError(f"cannot read the plan file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PlanFileError(f"{path} is not a plan file: it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise PlanFileError(f"{path} is not a plan file: its JSON is nested too deeply") from None
    try:
        return Plan.from_dict(data)
    except PlanFileError as e:
        raise PlanFileError(f"{path}: {e}") from None
