"""Attention backends: where a wave's KV lives and where decode attention runs, as one object the plan
names (`Plan.attention`). A backend carries
  - what it declares: its name, words for people, where KV and the product are, a rank (the solver
    keeps the lowest-ranked of backends predicted within its tie tolerance: the simplest);
  - its planner terms (classmethods): the device and host memory it holds, and its part of a step's
    time (KV over the link, new K/V stored back, the attention product on the GPU or the CPU);
  - its runtime (an instance the engine builds per run): the KV store and the decode/prefill calls.

A new backend is one file: a subclass registered with `register_attention` (see device_kv.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from offbatch.attention.wave import DecodeBatch, decode_attention, decode_batch, prefill_attention
from offbatch.models.spec import ModelSpec
from offbatch.offload.kv import KVFormat, WaveKV, kv_format
from offbatch.offload.kv_writer import KV_STAGING_BUFFERS, HostKVWriter, staging_rows


@dataclass
class StepTerms:
    """A backend's part of one step's time (planner.cost.StepModel.times), arrays over steps."""

    kv_link_bytes: np.ndarray  # host KV copied to the device (shares the link with weight copies)
    kv_store_bytes: np.ndarray  # new K/V copied back to host KV
    gpu_s: np.ndarray  # the attention product on the device
    cpu_s: np.ndarray  # the attention product on the host threads
    kv_copy_s: np.ndarray  # host KV copies issued on the compute stream (in the chain)
    kv_store_s: np.ndarray  # storing new K/V to host KV, beside the chain
    serial: list[np.ndarray] = field(default_factory=list)  # serial parts of the chain, added in order
    # The host thread's time issuing the backend's work (copies, patches), beside its launches: like them a
    # floor under the device chain, which can run no faster than the host feeds it.
    issue_s: np.ndarray | float = 0.0


@dataclass
class AttentionStep:
    """What one step's attention needs, the same for every layer (built once per step)."""

    decode: DecodeBatch | None
    prefill: list[tuple[int, int]]  # (slot, prompt tokens) of the sequences admitted this step
    groups: list[list[int]]  # indices into `prefill` attended together
    # A backend with its own decode path (hgca.py) keeps its per-step data here and its decode row count in
    # `rows`, and builds no DecodeBatch.
    own: object = None
    rows: int | None = None

    @property
    def decode_rows(self) -> int:
        if self.rows is not None:
            return self.rows
        return len(self.decode.slots) if self.decode is not None else 0


class AttentionBackend:
    name = "base"
    words = ""  # for a sentence: "KV on the GPU"
    kv_words = ""  # where the KV cache is: "GPU", "pinned host memory"
    attention_words = ""  # where decode attention runs: "on the GPU", ...
    kv_on_host = False  # the wave's KV in (pinned) host memory
    attends_on_host = False  # decode attention on the host threads
    needs_gpu = False  # a choice only where the compute device is a GPU
    lossy = False  # changes what attention computes: offered only where the user allows it
    rank = 0

    # ---- planner terms -----------------------------------------------------------------------------
    @staticmethod
    def kv_format_of(shape, knobs) -> KVFormat:
        return kv_format(knobs.kv_format, shape.dtype)

    @classmethod
    def device_bytes(cls, shape, knobs, max_len: int) -> dict[str, int]:
        """Device bytes this backend holds beside the step's activations: {"kv": ..., "activations": ...}."""
        raise NotImplementedError

    @classmethod
    def host_bytes(cls, shape, knobs, max_len: int, pinned: bool) -> int:
        """Host bytes it holds (host KV and what goes with it)."""
        return 0

    @classmethod
    def step_terms(cls, m, decode, T, covered, ctx_mean, zero) -> StepTerms:
        """Its part of a step of the StepModel m: decode sequences, T tokens, `covered` slots of the
        micro-batches that hold a live sequence, mean context ctx_mean (arrays over steps)."""
        raise NotImplementedError

    @classmethod
    def for_device(cls, device_type: str) -> type["AttentionBackend"]:
        """The backend that runs in its place on this device type: on a CPU the KV is in the compute
        device's memory whatever the plan says, so a GPU-only backend runs (and is priced) as device-kv."""
        return cls if not cls.needs_gpu or device_type == "cuda" else get_attention("device-kv")

    @classmethod
    def summary_words(cls, gpu: str) -> str:
        """For a plan's one-line summary; gpu: "GPU" or "compute device (CPU)"."""
        return cls.words

    @staticmethod
    def modules(spec: ModelSpec, layer: int) -> list[str]:
        """The modules of `layer` it acquires, in order."""
        return ["attn"]

    # ---- runtime -----------------------------------------------------------------------------------
    def __init__(self, spec: ModelSpec, plan, device, dtype: torch.dtype):
        """The wave's KV store for `plan` (wave_size slots of max_len positions) and, with host KV, its
        writer. On a CPU compute device the KV stays in its memory (and no writer runs)."""
        self.spec, self.plan = spec, plan
        self.device = torch.device(device)
        self.window = spec.sliding_window
        host_kv = self.kv_on_host and self.device.type != "cpu"
        kv_device = torch.device("cpu") if host_kv else self.device
        fmt = kv_format(plan.kv_format, dtype)
        self.kv = WaveKV(spec, plan.wave_size, plan.max_len, kv_device, dtype, pin=host_kv, fmt=fmt)
        self.attention_device = kv_device if host_kv and self.attends_on_host else self.device
        if host_kv:  # new K/V reach host KV through a copy stream and a writer thread
            rows = staging_rows(plan.prefill_tokens, plan.max_len, plan.wave_size)
            self.kv.writer = HostKVWriter(self.kv, rows, KV_STAGING_BUFFERS)
        # Seconds the compute thread spent in decode attention on the host (telemetry: it blocks the
        # thread that issues the copies).
        self.host_blocked_s = 0.0

    # slots
    @property
    def free(self) -> int:
        return self.kv.free

    def allocate(self) -> int:
        return self.kv.allocate()

    def release(self, slot: int) -> None:
        self.kv.release(slot)

    # traffic (bench reports it per step)
    @property
    def read_bytes(self) -> int:
        return self.kv.read_bytes

    @property
    def copied_bytes(self) -> int:
        return self.kv.copied_bytes

    @property
    def store_wait_s(self) -> float:
        """Compute thread blocked on the host KV writer (a free staging buffer, or settling a layer)."""
        return self.kv.writer.wait_s if self.kv.writer is not None else 0.0

    def drain(self) -> None:
        """Every asynchronous K/V write in place (and any writer error raised)."""
        self.kv.drain()

    def close(self) -> None:
        """End the writer's thread: it holds the host KV, which would stay after the engine otherwise."""
        self.kv.close()

    # attention
    def begin_step(self, dec_slots: list[int], dec_lengths: list[int], prefill: list[tuple[int, int]],
                   prefill_groups: list[list[int]]) -> AttentionStep:
        """dec_slots/dec_lengths: each decoding sequence's slot and KV length before this token;
        prefill: (slot, tokens) of each fresh prompt; prefill_groups: prompts attended together."""
        batch = (decode_batch(self.kv, list(dec_slots), list(dec_lengths), self.plan.attn_micro_batch,
                              self.attention_device) if dec_slots else None)
        return AttentionStep(batch, list(prefill), [list(g) for g in prefill_groups])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               step: AttentionStep) -> torch.Tensor:
        """q [T, nh, d], k/v [T, nkv, d]: decode rows first (one per decoding sequence, in begin_step's
        order), then the prompts' rows. Stores k/v; returns the attention output [T, nh, d]."""
        out = torch.empty_like(q)
        nd = step.decode_rows
        if nd:
            out[:nd] = self.decode(layer, q[:nd], k[:nd], v[:nd], step)[0]
        if step.prefill:
            out[nd:] = self.prefill(layer, q[nd:], k[nd:], v[nd:], step)
        return out

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: AttentionStep,
               lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decode rows: output [b, nh, d] and, when asked, the log-sum-exp [b, nh] (float32) of each
        query's scores (two partial attentions over disjoint keys merge by it: dense.merge_by_lse)."""
        t0 = time.perf_counter()
        out = decode_attention(self.kv, layer, q, k, v, step.decode, self.window, lse)
        if self.attention_device.type == "cpu" and self.device.type != "cpu":
            self.host_blocked_s += time.perf_counter() - t0
        return out

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                step: AttentionStep) -> torch.Tensor:
        """The prompts' rows: each attends to itself (causal); their K/V are stored."""
        return prefill_attention(self.kv, layer, q, k, v, step.prefill, step.groups, self.window)


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_attention(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    ATTENTION_BACKENDS[cls.name] = cls
    return cls


def get_attention(name: str) -> type[AttentionBackend]:
    if name not in ATTENTION_BACKENDS:
        raise KeyError(f"unknown attention backend {name!r} (known: {', '.join(attention_names())})")
    return ATTENTION_BACKENDS[name]


def attention_names() -> list[str]:
    """Registered backends, simplest first (by rank, then name)."""
    return [c.name for c in sorted(ATTENTION_BACKENDS.values(), key=lambda c: (c.rank, c.name))]
