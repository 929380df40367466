"""Next-token choice for a batch of sequences, each with its own sampling parameters and random stream.

Batch-independence is the point: a request's tokens must not depend on what else shares its batch or
how the engine batches it. So every request owns a CPU `torch.Generator` seeded from its own seed,
every step draws exactly one uniform number from it (whatever the filters left), and every filter
works row by row. The draw is inverse-CDF sampling over the filtered, sorted distribution: the only
random input is that one number, so the engine's device and batch shape never touch the stream.

Order of operations (Hugging Face warper order, vLLM names):
repetition penalty -> (temperature 0: argmax) -> temperature -> top_k -> top_p -> min_p -> draw.
"""

from __future__ import annotations

import math

import torch

from offbatch.engine.api import SamplingParams

_SEED_MASK = (1 << 64) - 1


def make_rng(params: SamplingParams, request_seed_fallback: int) -> torch.Generator | None:
    """The request's own random stream; None when it decodes greedily and needs none."""
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else request_seed_fallback
    rng = torch.Generator(device="cpu")
    rng.manual_seed(int(seed) & _SEED_MASK)  # manual_seed takes [0, 2**64); any int folds into it
    return rng


def apply_repetition_penalty(logits: torch.Tensor, penalties: list[float], histories: list[list[int]]) -> None:
    """In place, for every token seen in the row's prompt or output (each once, however often):
    positive logits are divided by the penalty, negative ones multiplied (HF/vLLM/CTRL semantics)."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and histories[i]]
    if not rows:
        return
    vocab = logits.shape[1]
    seen = torch.zeros((len(rows), vocab), dtype=torch.bool)
    for j, i in enumerate(rows):
        ids = torch.tensor(histories[i], dtype=torch.long)
        seen[j, ids[(ids >= 0) & (ids < vocab)]] = True
    seen = seen.to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    penalty = torch.tensor([penalties[i] for i in rows], dtype=sub.dtype, device=sub.device)[:, None]
    penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits.index_copy_(0, index, torch.where(seen, penalised, sub))


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


def sample_next(
    logits: torch.Tensor,
    params: list[SamplingParams],
    rngs: list[torch.Generator | None],
    histories: list[list[int]],
) -> list[int]:
    """Next token for each row of logits [B, V] (float32). histories[i] holds row i's prompt and
    generated ids (for the repetition penalty); rngs[i] comes from make_rng (None for greedy rows)."""
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(params)} requests")
    logits = logits.float().clone()
    apply_repetition_penalty(logits, [p.repetition_penalty for p in params], histories)

    out = logits.argmax(dim=1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        if any(rngs[i] is None for i in sampled):
            raise ValueError("a sampling request has no random generator; build one with make_rng")
        index = torch.tensor(sampled, device=logits.device)
        x, order = filtered_sorted_logits(logits.index_select(0, index), [params[i] for i in sampled])
        for i, token in zip(sampled, draw(x, order, [rngs[i] for i in sampled])):
            out[i] = token
    return out
