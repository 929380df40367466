"""Stop strings and the final text of a finished sequence.

Stop strings need text, and only the jobs layer has the tokenizer, so each GenRequest gets a
`stop_check` that the generator calls after every new token. The final text is cut before the first
stop string, and a closing eos / stop token is not part of it (as in vLLM and the OpenAI API).
Both decode with the request's skip_special_tokens, so a stop string is looked for in the text the
request gets back.
"""

from __future__ import annotations

from typing import Callable

from offbatch.engine.api import GenOutput, SamplingParams


def make_stop_check(tokenizer, stops: tuple[str, ...], params: SamplingParams,
                    skip_special_tokens: bool = True) -> Callable[[list[int]], bool] | None:
    if not stops and not params.stop_token_ids:
        return None
    stop_ids = set(params.stop_token_ids)
    # Only the tail can hold a stop string that was not there one token ago. A character is at most 4
    # UTF-8 bytes and a token at least one byte, so 4 tokens per character (plus slack for special
    # tokens that decode to nothing) are enough; decoding only that keeps each check O(1).
    window = 4 * max((len(s) for s in stops), default=0) + 8

    def stop_check(ids: list[int]) -> bool:
        if len(ids) < params.min_tokens:
            return False
        if ids and ids[-1] in stop_ids:
            return True
        if not stops:
            return False
        tail = tokenizer.decode(ids[-window:], skip_special_tokens=skip_special_tokens)
        if params.min_tokens <= 1:  # any stop string in the tail is new: an older one would have stopped it
            return any(s in tail for s in stops)
        # With min_tokens, stop strings inside the first tokens were passed over (as in vLLM): only one
        # that ends in the newest token's text counts.
        before = tokenizer.decode(ids[-window:-1], skip_special_tokens=skip_special_tokens)
        return _stop_at(tail, stops, _common_prefix(before, tail)) is not None

    return stop_check


def _common_prefix(a: str, b: str) -> int:
    """Length of the text a and b share at the start (a token can complete a character that decoded to
    U+FFFD while it was partial, so the shorter decode is not always a prefix)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _stop_at(text: str, stops: tuple[str, ...], settled: int) -> int | None:
    """Where text is cut: the earliest stop string that ends after its first `settled` characters."""
    cuts = [i for i in (text.find(s, max(0, settled - len(s) + 1)) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def finish_choice(tokenizer, out: GenOutput, stops: tuple[str, ...], params: SamplingParams,
                  eos_token_ids: tuple[int, ...], skip_special_tokens: bool = True) -> tuple[str, str, list[int]]:
    """(text, finish_reason, the completion's token ids) of a finished sequence. The ids are those the
    text was decoded from (a closing eos / stop token dropped), so logprobs can be cut to match."""
    ids = list(out.token_ids)
    finish = out.finish_reason
    enders = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    if ids and ids[-1] in enders and len(ids) >= params.min_tokens:
        ids = ids[:-1]
        finish = "stop"
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    # Stop strings in the text of the first min_tokens - 1 tokens were passed over while they were made.
    settled = (_common_prefix(tokenizer.decode(ids[: params.min_tokens - 1], skip_special_tokens=skip_special_tokens),
                              text) if params.min_tokens > 1 and stops else 0)
    cut = _stop_at(text, stops, settled)
    if cut is not None:
        text = text[:cut]
        finish = "stop"
    return text, finish, ids
