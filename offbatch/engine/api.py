"""The contract between jobs (requests in, results out) and whatever engine generates tokens.

The jobs layer turns JSONL lines into `GenRequest`s and hands an iterable of them to a `Generator`;
the generator yields a `GenOutput` as soon as each sequence finishes (not in input order), so results
can be flushed one by one. Every engine (the reference loop, the streaming engine) implements this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # None: derived from the request id, so reruns repeat
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0  # over prompt and output tokens (HF semantics)
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens: - presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI semantics, over output tokens: - frequency * count
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # None: no log-probabilities; k >= 0: each chosen token's log-probability (log-softmax of the
    # model's raw logits, before any penalty or temperature) plus the k likeliest alternatives.
    logprobs: int | None = None


@dataclass
class GenRequest:
    key: int  # unique within one generate() call; echoed in GenOutput
    prompt_ids: list[int]
    params: SamplingParams
    # Called after each new token with all generated ids so far; True stops the sequence with
    # finish_reason "stop" (the jobs layer uses it for stop strings, which need detokenising).
    stop_check: Callable[[list[int]], bool] | None = None
    # The stop strings behind stop_check, as data, and how the text they are looked for in is decoded: a
    # generator that runs the request in another process (offbatch/scale) cannot take the closure along,
    # so it rebuilds the check there (jobs.stops.make_stop_check). Engines in this process ignore them.
    stops: tuple[str, ...] = ()
    skip_special_tokens: bool = True


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), likeliest first


@dataclass
class GenOutput:
    key: int
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error" (then `error` says why; the request fails alone)
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry when params.logprobs is not None
    error: str | None = None


@dataclass
class GenStats:
    """Counters a generator keeps for progress and summaries."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    peak_gpu_reserved_bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Generator(Protocol):
    stats: GenStats

    def generate(self, requests: Iterable[GenRequest]) -> Iterator[GenOutput]:
        """Yield one GenOutput per request, each as soon as it finishes."""
        ...
