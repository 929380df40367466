"""One sequence being generated, and the rules every generator applies after each sampled token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from offbatch.engine.api import GenOutput, GenRequest


@dataclass
class SeqState:
    req: GenRequest
    rng: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def history(self) -> list[int]:
        return self.req.prompt_ids + self.generated

    def append(self, token: int, eos_ids, context_left: int, now: float) -> GenOutput | None:
        """Add a sampled token; the finished sequence's output if it ends here, else None.
        The terminating eos or stop token is not part of the completion."""
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
        ids = self.generated[:-1] if by_token else self.generated
        return GenOutput(self.req.key, ids, reason, len(self.req.prompt_ids),
                         {"ttft_s": self.first_token_at - self.started, "total_s": now - self.started})


def suppress_stop_tokens(logits: torch.Tensor, seqs: list[SeqState], eos_ids) -> None:
    """min_tokens: eos and stop tokens cannot be drawn before a sequence has that many tokens."""
    for row, s in enumerate(seqs):
        p = s.req.params
        if len(s.generated) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
            if banned:
                logits[row, banned] = float("-inf")
