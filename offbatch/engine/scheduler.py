"""The wave scheduler: which sequences run each step, and what the steps cost.

Every step runs one token for each running sequence plus the prompts of newly admitted ones (`step`,
the subclass's forward). New sequences are admitted while KV slots are free and the step's prompt-token
budget lasts; finished sequences leave at once and free their slot for a waiting one. Each step's wall
time, tokens and host-blocked time are accounted here (StepTimes, GenStats), for the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from offbatch.engine import sampler
from offbatch.engine.api import GenOutput, GenRequest, GenStats
from offbatch.engine.sequence import SeqState, sample_step
from offbatch.models.spec import ModelSpec
from offbatch.plan import Plan


@dataclass
class LiveSeq(SeqState):
    slot: int = -1  # the sequence's KV slot in the wave
    length: int = 0  # tokens in the KV cache


@dataclass
class StepTimes:
    steps: int = 0
    wall_s: float = 0.0
    weight_wait_s: float = 0.0  # compute stream stalled on a copy (device-side, from events)
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_wall_s: float = 0.0
    decode_tokens: int = 0
    prefill_wall_s: float = 0.0
    prefill_tokens: int = 0
    # Host time blocked (wall clock, both step kinds): where the host thread, which also issues the copies,
    # could not run ahead of the device.
    router_sync_s: float = 0.0  # waiting for each MoE layer's routing counts
    cpu_attention_s: float = 0.0  # decode attention on the host threads (q over, output back included)
    prefill_router_sync_s: float = 0.0  # of them, in steps that admitted prompts
    prefill_cpu_attention_s: float = 0.0


class WaveScheduler:
    """Admission, finishing and accounting over a wave of KV slots. A subclass provides the forward
    (`step`), the slots (`slots`: allocate, release, free), where host time was blocked (`blocked_s`),
    the step's device wait for weights (`weight_wait_s`), and `_end_generate`."""

    def __init__(self, spec: ModelSpec, plan: Plan, device: torch.device, eos_token_ids: Iterable[int]):
        self.spec, self.plan, self.device = spec, plan, device
        self.eos_ids = tuple(eos_token_ids)
        self.stats = GenStats()
        self.times = StepTimes()
        self.step_kinds: list[str] = []  # "prefill" or "decode", one per step, beside pf.stats.per_step_bytes
        self.step_walls: list[float] = []  # each step's wall time, beside step_kinds
        self._blocked_mark = (0.0, 0.0)  # host-blocked totals at the start of the step (prefill share)
        # A split weight stream's group (offload/shard_group.py): the ranks step together; None alone.
        self.group = None
        self.idle_steps = 0  # steps this rank ran with no sequence of its own, for the others

    # ---- what the forward side provides -----------------------------------------------------
    slots = None

    def step(self, dec: list[LiveSeq], pre: list[tuple[LiveSeq, int]]) -> torch.Tensor:
        raise NotImplementedError

    def blocked_s(self) -> tuple[float, float]:
        """Host time blocked so far: (on MoE routing counts, in CPU attention)."""
        return 0.0, 0.0

    def weight_wait_s(self) -> float:
        return 0.0

    def _begin_step(self) -> None:
        pass

    def _end_generate(self) -> None:
        pass

    def _idle_step(self) -> None:
        """A step with no sequence of this rank's while other ranks of its group still have some."""
        raise NotImplementedError

    # ---- the wave loop ---------------------------------------------------------------------
    def _admit(self, pending: Iterator[GenRequest], waiting: list[GenRequest]) -> list[LiveSeq]:
        """New sequences for this step, within free KV slots and the step's prompt-token budget."""
        new, budget = [], self.plan.prefill_tokens
        while self.slots.free:
            req = waiting.pop() if waiting else next(pending, None)
            if req is None:
                break
            n = len(req.prompt_ids)
            if n + 1 > self.plan.max_len:
                raise ValueError(f"request {req.key}: prompt of {n} tokens exceeds the planned context {self.plan.max_len}")
            if new and n > budget:
                waiting.append(req)
                break
            budget -= n
            new.append(LiveSeq(req, sampler.make_rng(req.params, req.key), slot=self.slots.allocate()))
            if budget <= 0:
                break
        return new

    def generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        try:
            yield from self._generate(requests)
        finally:
            self._end_generate()

    def _generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        pending = iter(requests)
        waiting: list[GenRequest] = []
        live: list[LiveSeq] = []
        while True:
            new = self._admit(pending, waiting)
            if self.group is not None and self.group.world > 1:
                # Every rank of a split stream runs every step: one with nothing left streams its chunks
                # for the others until no rank has a sequence.
                if not self.group.any_work(bool(live or new)):
                    return
                if not live and not new:
                    self._idle_step()
                    self.idle_steps += 1
                    continue
            elif not live and not new:
                return
            t0 = time.perf_counter()
            self._begin_step()
            self._blocked_mark = self.blocked_s()
            logits = self.step(live, [(s, len(s.req.prompt_ids)) for s in new])
            step = live + new
            picks = sample_step(logits, step, self.eos_ids)  # host sync: the step is done
            self._account(time.perf_counter() - t0, len(step), sum(len(s.req.prompt_ids) for s in new))
            live = []
            now = time.perf_counter()
            for s, pick in zip(step, picks):
                room = min(self.plan.max_len, self.spec.max_position) - s.length - 1
                out = s.advance(pick, self.eos_ids, room, now)
                if out is None:
                    live.append(s)
                else:
                    self.slots.release(s.slot)
                    yield out

    def _account(self, wall: float, n_sampled: int, n_prompt: int) -> None:
        t = self.times
        t.steps += 1
        t.wall_s += wall
        t.weight_wait_s += self.weight_wait_s()
        self.step_kinds.append("prefill" if n_prompt else "decode")
        self.step_walls.append(wall)
        t.router_sync_s, t.cpu_attention_s = self.blocked_s()
        if n_prompt:
            sync0, attn0 = self._blocked_mark
            t.prefill_router_sync_s += t.router_sync_s - sync0
            t.prefill_cpu_attention_s += t.cpu_attention_s - attn0
            t.prefill_steps += 1
            t.prefill_wall_s += wall
            t.prefill_tokens += n_prompt
        else:
            t.decode_steps += 1
            t.decode_wall_s += wall
            t.decode_tokens += n_sampled
        self.stats.prompt_tokens += n_prompt
        self.stats.generated_tokens += n_sampled
        if self.device.type == "cuda":
            self.stats.peak_gpu_reserved_bytes = torch.cuda.max_memory_reserved(self.device)
