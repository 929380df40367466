"""Next-token choice for a batch of sequences, each with its own sampling parameters and random stream.

Batch-independence is the point: a request's tokens must not depend on what else shares its batch or
how the engine batches it. So every request owns a CPU `torch.Generator` seeded from its own seed,
every step draws exactly one uniform number from it (whatever the filters left), and every filter
works row by row. The draw is inverse-CDF sampling over the filtered, sorted distribution: the only
random input is that one number, so the engine's device and batch shape never touch the stream.

The sampler works on its own float32 copy of the logits: the engines' tensors (made under
torch.inference_mode, possibly shared with the next step) are only read, never written.

Order of operations (vLLM's, with Hugging Face warper order for the filters):
  raw logits -> log-probabilities (when asked: log_softmax of the RAW logits, before any bias,
  penalty or temperature, as vLLM's default raw logprobs) -> logit_bias -> min_tokens (eos and stop
  tokens banned) -> repetition penalty -> frequency and presence penalties -> (temperature below
  GREEDY_BELOW: argmax) -> temperature -> top_k -> top_p -> min_p -> draw.
A row whose raw logits hold NaN or +Inf, or nothing finite, gets no token: the sequence fails alone
(Pick.token is None) instead of turning garbage into text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from offbatch import plan as _plan

from offbatch.engine.api import SamplingParams, TokenLogprob
from offbatch.engine.penalties import (apply_logit_bias, apply_output_penalties, apply_repetition_penalty,  # noqa: F401
                                      ban_tokens)

_SEED_MASK = (1 << 64) - 1
# Temperatures this small are greedy (vLLM's _SAMPLING_EPS): dividing float32 logits by them would
# overflow to inf (or divide by a temperature that rounded to 0) and turn the row into NaN.
GREEDY_BELOW = 1e-5


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def make_rng(params: SamplingParams, request_seed_fallback: int) -> torch.Generator | None:
    """The request's own random stream; None when it decodes greedily and needs none."""
    if is_greedy(params):
        return None
    seed = params.seed if params.seed is not None else request_seed_fallback
    rng = torch.Generator(device="cpu")
    rng.manual_seed(int(seed) & _SEED_MASK)  # manual_seed takes [0, 2**64); any int folds into it
    return rng


@dataclass
class Row:
    """What the sampler needs to know about one sequence at this step."""

    params: SamplingParams
    rng: torch.Generator | None = None
    prompt: Sequence[int] = ()
    output: Sequence[int] = ()  # the tokens generated so far
    banned: Sequence[int] = ()  # ids that cannot be chosen at this step (eos/stop before min_tokens)


@dataclass
class Pick:
    token: int | None  # None: the row's logits were not finite; the sequence must fail
    logprob: TokenLogprob | None = None  # when the row's params ask for logprobs


def nonfinite_rows(raw: torch.Tensor) -> list[int]:
    """Rows holding NaN or +Inf, or no finite value at all (-Inf alone is a legal mask). One isfinite
    over the batch decides; the row-by-row look happens only when something is off."""
    finite = torch.isfinite(raw)
    if bool(finite.all()):
        return []
    bad = torch.isnan(raw).any(dim=1) | torch.isposinf(raw).any(dim=1) | ~finite.any(dim=1)
    return bad.nonzero().flatten().tolist()


def token_logprobs(raw: torch.Tensor, rows: list[int], tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Each chosen token's log-probability under the raw logits, plus the k likeliest alternatives."""
    index = torch.tensor(rows, dtype=torch.long, device=raw.device)
    logp = raw.index_select(0, index).log_softmax(dim=1)
    chosen = logp.gather(1, torch.tensor(tokens, dtype=torch.long, device=raw.device)[:, None]).squeeze(1).tolist()
    k_max = min(max(ks), logp.shape[1])
    if k_max > 0:
        top_v, top_i = logp.topk(k_max, dim=1)  # sorted, likeliest first
        top_v, top_i = top_v.tolist(), top_i.tolist()
    out = []
    for j, (token, lp, k) in enumerate(zip(tokens, chosen, ks)):
        top = list(zip(top_i[j][:k], top_v[j][:k])) if k_max > 0 and k > 0 else []
        out.append(TokenLogprob(token, lp, top))
    return out


def filtered_sorted_logits(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top_k, top_p and min_p for rows that sample. Returns (sorted logits with removed
    entries at -inf, their token ids); entry 0 of each row, the most likely token, is always kept."""
    vocab = logits.shape[1]
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)[:, None]
    x, order = (logits / temperature).sort(dim=1, descending=True, stable=True)
    rank = torch.arange(vocab, device=device)[None, :]
    remove = torch.zeros_like(x, dtype=torch.bool)

    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)[:, None]
    remove |= rank >= top_k

    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        # Keep the smallest prefix whose probability reaches top_p: drop a token when the mass
        # strictly before it already does. Computed after top_k, as HF does.
        probs = x.masked_fill(remove, -math.inf).softmax(dim=1).double()
        mass_before = probs.cumsum(dim=1) - probs
        limit = torch.tensor(top_p, dtype=torch.float64, device=device)[:, None]
        remove |= mass_before >= limit

    min_p = [p.min_p for p in params]
    if any(p > 0.0 for p in min_p):
        # p_i >= min_p * p_max  <=>  x_i - x_max >= log(min_p); renormalising does not change the ratio.
        log_min_p = torch.tensor([math.log(p) if p > 0 else -math.inf for p in min_p], device=device)[:, None]
        remove |= (x - x[:, :1]) < log_min_p

    remove[:, 0] = False
    return x.masked_fill(remove, -math.inf), order


def draw(sorted_logits: torch.Tensor, order: torch.Tensor, rngs: list[torch.Generator]) -> list[int]:
    """One uniform number per row from the row's own generator, mapped through the row's CDF."""
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in rngs]).to(sorted_logits.device)
    cdf = sorted_logits.softmax(dim=1).double().cumsum(dim=1)
    # Scale by the row total instead of trusting it to be exactly 1 after float rounding.
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    kept = torch.isfinite(sorted_logits).sum(dim=1, keepdim=True)
    pick = torch.minimum(pick, kept - 1)  # never land on a removed entry, even when u*total rounds up
    return order.gather(1, pick).squeeze(1).tolist()


# Rows are sampled in chunks of at most SAMPLE_CHUNK_ENTRIES (offbatch/plan.py) rows x vocabulary: the copies
# (float32 logits, sorted logits and their int64 order, float64 probabilities and CDF) of a whole wave would
# not fit a capped GPU. Each row has its own generator: the tokens do not depend on the chunking.


def sample_rows(logits: torch.Tensor, rows: list[Row]) -> list[Pick]:
    """The next token of each row of logits [B, V] (read only, any float dtype), with its
    log-probabilities when the row's params ask for them; Pick.token is None for a row whose logits
    are not finite."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} requests")
    step = max(1, _plan.SAMPLE_CHUNK_ENTRIES // max(1, logits.shape[1]))
    if len(rows) <= step:
        return _sample_chunk(logits, rows)
    return [p for a in range(0, len(rows), step) for p in _sample_chunk(logits[a : a + step], rows[a : a + step])]


def _sample_chunk(logits: torch.Tensor, rows: list[Row]) -> list[Pick]:
    params = [r.params for r in rows]
    raw = logits.detach().to(torch.float32, copy=True)  # our own copy: the engine's tensor is never written
    bad = set(nonfinite_rows(raw))
    if bad:
        raw[torch.tensor(sorted(bad), device=raw.device)] = 0.0  # keeps NaN out of the batch-wide ops below
    # Bias and penalties change x in place; logprobs need the raw values, so only then a second copy.
    x = raw.clone() if any(p.logprobs is not None for p in params) else raw
    if any(p.logit_bias for p in params):
        apply_logit_bias(x, [p.logit_bias for p in params])
    if any(r.banned for r in rows):
        ban_tokens(x, [r.banned for r in rows])
    apply_repetition_penalty(x, [p.repetition_penalty for p in params], [_history(r) for r in rows])
    apply_output_penalties(x, [p.frequency_penalty for p in params], [p.presence_penalty for p in params],
                           [r.output for r in rows])

    tokens: list[int | None] = x.argmax(dim=1).tolist()
    sampled = [i for i, p in enumerate(params) if not is_greedy(p) and i not in bad]
    if sampled:
        if any(rows[i].rng is None for i in sampled):
            raise ValueError("a sampling request has no random generator; build one with make_rng")
        index = torch.tensor(sampled, device=x.device)
        fx, order = filtered_sorted_logits(x.index_select(0, index), [params[i] for i in sampled])
        for i, token in zip(sampled, draw(fx, order, [rows[i].rng for i in sampled])):
            tokens[i] = token
    for i in bad:
        tokens[i] = None

    picks = [Pick(t) for t in tokens]
    want = [i for i, p in enumerate(params) if p.logprobs is not None and i not in bad]
    if want:
        lps = token_logprobs(raw, want, [tokens[i] for i in want], [params[i].logprobs for i in want])
        for i, lp in zip(want, lps):
            picks[i].logprob = lp
    return picks


def _history(row: Row) -> Sequence[int]:
    # Only rows with a repetition penalty read it; the others get an empty one at no cost.
    if row.params.repetition_penalty == 1.0:
        return ()
    return list(row.prompt) + list(row.output)


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    rngs: list[torch.Generator | None],
    histories: list[list[int]],
) -> list[int]:
    """Tokens only, for callers (and tests) that need no logprobs, min_tokens or output penalties:
    histories[i] holds row i's earlier ids, seen by the repetition penalty."""
    rows = [Row(p, g, prompt=h) for p, g, h in zip(params, rngs, histories)]
    if len(rows) != logits.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} requests")
    return [p.token for p in sample_rows(logits, rows)]
