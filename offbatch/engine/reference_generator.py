"""Continuous batching over the reference forward: the CPU path and the oracle for the fast engine.

Each step runs, in one ragged forward, the prompts of newly admitted sequences and one decode token
for every running one; finished sequences are yielded at once and their slots refilled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from offbatch.engine import sampler
from offbatch.engine.api import GenOutput, GenRequest, GenStats
from offbatch.models.reference import KVCache, ReferenceModel


@dataclass
class Sequence:
    req: GenRequest
    cache: KVCache
    rng: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def history(self) -> list[int]:
        return self.req.prompt_ids + self.generated


def finish_reason(seq_params, token: int, generated: list[int], eos_ids, context_left: int, stop_check) -> str | None:
    """Why a sequence ends after `token` was sampled (already appended to `generated`), or None."""
    if token in seq_params.stop_token_ids or (not seq_params.ignore_eos and token in eos_ids):
        return "stop"
    if stop_check is not None and stop_check(generated):
        return "stop"
    if len(generated) >= seq_params.max_tokens or context_left <= 0:
        return "length"
    return None


def suppress_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids) -> None:
    """min_tokens: eos and stop tokens cannot be drawn before a sequence has that many tokens."""
    for row, s in enumerate(seqs):
        p = s.req.params
        if len(s.generated) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                logits[row, banned] = float("-inf")


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
            new.append(Sequence(req, cache, sampler.make_rng(req.params, req.key)))
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
            suppress_stop_tokens(logits, step, self.eos_ids)
            nxt = sampler.sample_next(logits, [s.req.params for s in step], [s.rng for s in step],
                                      [s.history for s in step])
            self.stats.generated_tokens += len(step)
            live = []
            now = time.perf_counter()
            for s, tok in zip(step, nxt):
                s.generated.append(tok)
                s.first_token_at = s.first_token_at or now
                reason = finish_reason(s.req.params, tok, s.generated, self.eos_ids,
                                       max_ctx - s.cache.length - 1, s.req.stop_check)
                if reason is None:
                    live.append(s)
                    continue
                ids = s.generated
                if tok in s.req.params.stop_token_ids or (not s.req.params.ignore_eos and tok in self.eos_ids):
                    ids = ids[:-1]  # the terminating token is not part of the completion
                yield GenOutput(s.req.key, ids, reason, len(s.req.prompt_ids),
                                {"ttft_s": s.first_token_at - s.started, "total_s": now - s.started})
