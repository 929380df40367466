"""Continuous batching over the reference forward: the CPU path and the oracle for the fast engine.

Each step runs, in one ragged forward, the prompts of newly admitted sequences and one decode token
for every running one; finished sequences are yielded at once and their slots refilled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator


from offbatch.engine import sampler
from offbatch.engine.api import GenOutput, GenRequest, GenStats
from offbatch.engine.sequence import SeqState, sample_step
from offbatch.engine.reference import KVCache, ReferenceModel


@dataclass
class Sequence(SeqState):
    cache: KVCache | None = None


class ReferenceGenerator:
    def __init__(self, model: ReferenceModel, eos_token_ids: Iterable[int], max_batch: int = 32,
                 prefill_tokens: int = 4096):
        self.model = model
        self.eos_ids = tuple(eos_token_ids)
        self.max_batch = max_batch
        self.prefill_tokens = prefill_tokens  # prompt tokens admitted per step, bounds activation memory
        self.stats = GenStats()

    def _admit(self, pending: Iterator[GenRequest], live: list[Sequence], carry: list) -> list[Sequence]:
        new: list[Sequence] = []
        budget = self.prefill_tokens
        while len(live) + len(new) < self.max_batch:
            req = carry.pop() if carry else next(pending, None)
            if req is None:
                break
            if new and len(req.prompt_ids) > budget:
                carry.append(req)  # next step
                break
            budget -= len(req.prompt_ids)
            cache = self.model.new_cache(len(req.prompt_ids) + min(req.params.max_tokens, 256))
            new.append(Sequence(req, sampler.make_rng(req.params, req.key), cache=cache))
        return new

    def generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        pending = iter(requests)
        carry: list[GenRequest] = []
        live: list[Sequence] = []
        max_ctx = self.model.spec.max_position
        while True:
            new = self._admit(pending, live, carry)
            if not live and not new:
                return
            step = live + new
            tokens = [[s.generated[-1]] for s in live] + [s.req.prompt_ids for s in new]
            logits = self.model.forward([s.cache for s in step], tokens)
            self.stats.prompt_tokens += sum(len(s.req.prompt_ids) for s in new)
            picks = sample_step(logits, step, self.eos_ids)
            self.stats.generated_tokens += len(step)
            live = []
            now = time.perf_counter()
            for s, pick in zip(step, picks):
                out = s.advance(pick, self.eos_ids, max_ctx - s.cache.length - 1, now)
                if out is None:
                    live.append(s)
                else:
                    yield out
