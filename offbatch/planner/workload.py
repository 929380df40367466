"""The job a plan is for: how many requests, how long their prompts are and how much each generates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from offbatch.errors import OffbatchError


@dataclass(frozen=True)
class Workload:
    num_requests: int
    prompt_len: float  # mean prompt tokens
    gen_len: float  # mean generated tokens
    max_prompt_len: int  # the longest prompt (one must fit a step's prefill budget)
    max_len: int  # the longest prompt + generation: the KV context every slot is sized for

    def __post_init__(self):
        if self.num_requests < 1 or self.prompt_len < 1 or self.gen_len < 1:
            raise OffbatchError("a workload needs at least one request, one prompt token and one generated token")
        if self.max_len < self.max_prompt_len + 1:
            raise OffbatchError("max_len must leave room for at least one generated token")

    @staticmethod
    def uniform(num_requests: int, prompt_len: int, gen_len: int) -> "Workload":
        return Workload(num_requests, prompt_len, gen_len, prompt_len, prompt_len + gen_len)

    @staticmethod
    def from_lengths(prompt_lens: list[int], gen_lens: list[int]) -> "Workload":
        if not prompt_lens:
            raise OffbatchError("no runnable request to plan for")
        n = len(prompt_lens)
        return Workload(n, sum(prompt_lens) / n, sum(gen_lens) / n, max(prompt_lens),
                        max(p + g for p, g in zip(prompt_lens, gen_lens)))

    @staticmethod
    def guess(num_requests: int, max_len: int) -> "Workload":
        """Only a context is known (an engine built without its job): assume prompts of 3/4 of it."""
        prompt = max(1, min(max_len - 1, math.ceil(0.75 * max_len)))
        return Workload(max(1, num_requests), prompt, max(1, max_len - prompt), max_len - 1, max_len)

    def describe(self) -> dict:
        return {"num_requests": self.num_requests, "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                "max_prompt_len": self.max_prompt_len, "max_len": self.max_len}
