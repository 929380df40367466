"""Plan: placement and batch sizes for the streaming engine; the simple rules that chose them before
the solver (kept as a baseline for `scripts/plan_grid.py`); saving and loading a plan as JSON.

The rules: decode streams every non-resident weight byte once per step whatever the wave size, so
tokens per step (the wave) is worth more than residency: size the wave first (as many KV slots as the
cap allows, up to the number of requests), then make modules resident with what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offbatch.errors import BudgetError, OffbatchError
from offbatch.models.spec import ModelSpec
from offbatch.offload.kv import WaveKV
from offbatch.offload.weights import ModuleKey, WeightStore, module_kind
from offbatch.planner.memory import DEFAULT_SLOTS, SAFETY, SCORE_BYTES, activation_bytes  # noqa: F401 (re-exported)
from offbatch.units import format_bytes

PLAN_FORMAT = 1


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
    kv_placement: str = "gpu"  # "gpu": the wave's KV on the device; "host": pinned host memory
    decode_attention: str = "gpu"  # with host KV: "gpu" copies a micro-batch's KV over, "cpu" attends on the host
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

    def describe(self) -> dict:
        return {
            "device": self.device, "dtype": str(self.dtype).replace("torch.", ""), "wave_size": self.wave_size,
            "max_len": self.max_len, "prefill_tokens": self.prefill_tokens,
            "attn_micro_batch": self.attn_micro_batch, "ffn_micro_tokens": self.ffn_micro_tokens,
            "slots": self.slots, "resident_modules": len(self.resident), "budget_bytes": self.budget_bytes,
            "memory": self.memory, "kv_placement": self.kv_placement, "decode_attention": self.decode_attention,
            "host_memory": self.host_memory, "hardware": self.hardware, "chosen_by": self.chosen_by,
            "disk_modules": len(self.disk), "staging_buffers": self.staging_buffers, "predicted": self.predicted,
            "residency_order": self.residency_order,
        }

    def summary(self) -> str:
        """One line for a job's log: where things are, the batch sizes, what the model expects, and why."""
        gpu = "GPU" if self.device.startswith("cuda") else "compute device (CPU)"
        kv = f"KV on the {gpu}" if self.kv_placement == "gpu" else f"KV in host memory, decode attention on the {self.decode_attention.upper()}"
        mem = self.memory or {}
        parts = [f"plan ({'from file' if self.chosen_by == 'file' else self.chosen_by}): {kv}, wave {self.wave_size}, "
                 f"prefill {self.prefill_tokens} tok/step, attention mb {self.attn_micro_batch}, FFN mb {self.ffn_micro_tokens}"]
        if mem:
            spread = ", spread over the step" if self.residency_order == "spread" else ""
            parts.append(f"{gpu.split()[0]} {format_bytes(sum(mem.values()))} ({format_bytes(mem.get('resident_weights', 0))} "
                         f"resident weights{spread}{f', {len(self.disk)} modules on disk' if self.disk else ''})")
        pred = self.predicted or {}
        if pred.get("e2e_tok_s"):
            parts.append(f"predicted {pred['e2e_tok_s']:,.0f} tok/s end to end (decode {pred['decode_tok_s']:,.0f}, "
                         f"prefill {pred['prefill_tok_s']:,.0f})")
        line = "; ".join(parts)
        if pred.get("bottleneck"):
            line += f"\n  bottleneck: {pred['bottleneck']}"
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
        if isinstance(d, dict) and "plan" in d and isinstance(d["plan"], dict):
            d = d["plan"]  # a whole `offbatch plan --json` report
        try:
            dtype = getattr(torch, d["dtype"])
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype {d['dtype']!r}")
            plan = Plan(
                device=str(d["device"]), dtype=dtype, wave_size=int(d["wave_size"]), max_len=int(d["max_len"]),
                prefill_tokens=int(d["prefill_tokens"]), attn_micro_batch=int(d["attn_micro_batch"]),
                ffn_micro_tokens=int(d["ffn_micro_tokens"]), slots={str(k): int(v) for k, v in d["slots"].items()},
                resident={(int(k[0]), str(k[1])) for k in d["resident"]},
                score_bytes=int(d.get("score_bytes", SCORE_BYTES)), kv_placement=d.get("kv_placement", "gpu"),
                decode_attention=d.get("decode_attention", "gpu"), budget_bytes=d.get("budget_bytes"),
                memory=dict(d.get("memory", {})), host_memory=dict(d.get("host_memory", {})),
                predicted=dict(d.get("predicted", {})), hardware=str(d.get("hardware", "")), chosen_by="file",
                disk={(int(k[0]), str(k[1])) for k in d.get("disk", [])},
                staging_buffers=int(d.get("staging_buffers", 2)),
                residency_order=str(d.get("residency_order", "layer")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise OffbatchError(f"not a plan file ({type(e).__name__}: {e}); write one with `offbatch plan ... --json`") from None
        if plan.residency_order not in ("layer", "spread"):
            raise OffbatchError(f"a plan's residency_order is layer or spread, not {plan.residency_order!r}")
        if plan.kv_placement not in ("gpu", "host") or plan.decode_attention not in ("gpu", "cpu"):
            raise OffbatchError("a plan's kv_placement is gpu or host, its decode_attention gpu or cpu")
        if min(plan.wave_size, plan.max_len, plan.prefill_tokens, plan.attn_micro_batch, plan.ffn_micro_tokens) < 1:
            raise OffbatchError("a plan's wave, context and batch sizes must be at least 1")
        return plan


def rule_plan(spec: ModelSpec, store: WeightStore, device: str, budget: int | None, num_requests: int,
              max_len: int, prefill_tokens: int = 8192, ffn_micro_tokens: int = 4096,
              attn_micro_batch: int = 64, max_wave: int = 1024, max_resident_bytes: int | None = None) -> Plan:
    dsize = torch.tensor([], dtype=store.dtype).element_size()
    kinds: dict[str, int] = {}
    for key in store.keys():
        if key[0] >= 0 or key[1] == "head":
            kind = module_kind(key[1])
            kinds[kind] = max(kinds.get(kind, 0), store.nbytes(key))
    slots = {k: DEFAULT_SLOTS.get(k, 2) for k in kinds}
    # Routers and norms are tiny and needed by every token: always resident.
    resident = {k for k in store.keys() if k[1] == "router"}
    slots.pop("router", None)
    fixed = sum(store.nbytes(k) for k in resident)
    slot_bytes = sum(slots[k] * kinds[k] for k in slots)
    prefill_tokens = max(1, min(prefill_tokens, max(num_requests, 1) * max_len))
    ffn_micro_tokens = min(ffn_micro_tokens, prefill_tokens + max_wave)
    kv_slot = WaveKV.bytes_per_slot(spec, max_len, dsize)

    def need(wave: int) -> int:
        act = activation_bytes(spec, prefill_tokens + wave, ffn_micro_tokens, min(attn_micro_batch, wave), max_len, dsize)
        return fixed + slot_bytes + wave * kv_slot + act

    wave = max(1, min(num_requests, max_wave))
    if budget is not None:
        usable = int(budget * SAFETY)
        # Shrink the transient sizes (halving) before giving up.
        while need(1) > usable and (prefill_tokens > max_len or ffn_micro_tokens > 256):
            prefill_tokens = max(max_len, prefill_tokens // 2)
            ffn_micro_tokens = max(256, ffn_micro_tokens // 2)
        if need(1) > usable:
            raise BudgetError(
                f"--gpu-memory {format_bytes(budget)} is too small for this model: streaming needs at least "
                f"{format_bytes(need(1) / SAFETY)} (weight buffers {format_bytes(slot_bytes)}, one sequence's KV "
                f"{format_bytes(kv_slot)}, activations); give more GPU memory or shorter --max-tokens"
            )
        while wave > 1 and need(wave) > usable:
            wave = max(1, min(wave - 1, int(wave * 0.9)))
        # Equal waves: 1024 requests in waves of 500 would leave a last wave of 24 decoding alone.
        if num_requests > wave:
            waves = -(-num_requests // wave)
            wave = -(-num_requests // waves)
        left = usable - need(wave)
    else:
        left = 1 << 62
    if max_resident_bytes is not None:  # tests and benchmarks: force streaming
        left = min(left, max_resident_bytes)
    # Residency with what is left: the output head first (every step reads all of it), then layers in
    # order. Slots of a kind whose every module became resident are given back.
    order = [k for k in store.keys() if k[1] == "head"] + sorted(
        (k for k in store.keys() if k[0] >= 0 and k not in resident), key=lambda k: (k[0], k[1]))
    for key in order:
        n = store.nbytes(key)
        if n <= left:
            resident.add(key)
            left -= n
    for kind in list(slots):
        if all(k in resident for k in store.keys() if (k[0] >= 0 or k[1] == "head") and module_kind(k[1]) == kind):
            left += slots.pop(kind) * kinds[kind]
    memory = {
        "kv": wave * kv_slot,
        "weight_slots": sum(slots[k] * kinds[k] for k in slots),
        "resident_weights": sum(store.nbytes(k) for k in resident),
        "activations": activation_bytes(spec, prefill_tokens + wave, ffn_micro_tokens,
                                        min(attn_micro_batch, wave), max_len, dsize),
    }
    return Plan(device=device, dtype=store.dtype, wave_size=wave, max_len=max_len, prefill_tokens=prefill_tokens,
                attn_micro_batch=min(attn_micro_batch, wave), ffn_micro_tokens=ffn_micro_tokens, slots=slots,
                resident=resident, budget_bytes=budget, memory=memory)


def load_plan_file(path) -> Plan:
    """A plan saved by `offbatch plan --json` (the whole report or its "plan"), as one clear error if not."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise OffbatchError(f"cannot read the plan file {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise OffbatchError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    return Plan.from_dict(data)
