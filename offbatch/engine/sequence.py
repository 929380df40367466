"""One sequence being generated, and the rules every generator applies after each sampled token.

Both engines run the same step: `sample_step(logits, seqs, eos_ids)` picks each sequence's next
token (the sampler works on its own copy of the logits), then `seq.advance(pick, ...)` adds it and
says whether the sequence ended: by eos / a stop token / a stop string ("stop"), at max_tokens or the
context edge ("length"), or because the model's logits were not finite ("error": the request fails
alone, with a message that says what is broken).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from offbatch.engine import sampler
from offbatch.engine.api import GenOutput, GenRequest, TokenLogprob

NONFINITE = ("the model produced non-finite logits (NaN/Inf) at token {n}: its weights or the compute dtype "
             "are broken")


@dataclass
class SeqState:
    req: GenRequest
    rng: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def banned(self, eos_ids) -> tuple[int, ...]:
        """min_tokens: eos and stop tokens cannot be drawn before the sequence has that many tokens."""
        p = self.req.params
        if len(self.generated) >= p.min_tokens:
            return ()
        return tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(eos_ids))

    def sampling_row(self, eos_ids) -> sampler.Row:
        return sampler.Row(self.req.params, self.rng, self.req.prompt_ids, self.generated, self.banned(eos_ids))

    def advance(self, pick: sampler.Pick, eos_ids, context_left: int, now: float) -> GenOutput | None:
        """Take the sampler's pick; the finished sequence's output if it ends here, else None."""
        if pick.token is None:
            return self._output(list(self.generated), "error", now, error=NONFINITE.format(n=len(self.generated) + 1))
        if pick.logprob is not None:
            self.logprobs.append(pick.logprob)
        return self.append(pick.token, eos_ids, context_left, now)

    def append(self, token: int, eos_ids, context_left: int, now: float) -> GenOutput | None:
        """Add a sampled token; the finished sequence's output if it ends here, else None.
        The terminating eos or stop token is not part of the completion (nor of its logprobs)."""
        self.generated.append(token)
        self.first_token_at = self.first_token_at or now
        p = self.req.params
        by_token = token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids)
        if by_token or (self.req.stop_check is not None and self.req.stop_check(self.generated)):
            reason = "stop"
        elif len(self.generated) >= p.max_tokens or context_left <= 0:
            reason = "length"
        else:
            return None
        return self._output(self.generated[:-1] if by_token else self.generated, reason, now)

    def _output(self, ids: list[int], reason: str, now: float, error: str | None = None) -> GenOutput:
        logprobs = None
        if self.req.params.logprobs is not None:
            logprobs = self.logprobs[: len(ids)]
        started = self.first_token_at or now
        return GenOutput(self.req.key, list(ids), reason, len(self.req.prompt_ids),
                         {"ttft_s": started - self.started, "total_s": now - self.started},
                         logprobs=logprobs, error=error)


def sample_step(logits: torch.Tensor, seqs: list[SeqState], eos_ids) -> list[sampler.Pick]:
    """Each sequence's next token from this step's logits [len(seqs), V]; the logits are only read."""
    return sampler.sample_rows(logits, [s.sampling_row(eos_ids) for s in seqs])
