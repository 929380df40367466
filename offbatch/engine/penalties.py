"""Logit processors of the sampler (sampler.py's order of operations): logit_bias, banned tokens
(min_tokens), the repetition penalty and the output frequency/presence penalties - each in place, row
by row, on the sampler's own float32 copy of the logits."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> None:
    """In place: each row's (token id, bias) pairs added to its logits. Ids outside the logits are
    skipped (the jobs layer rejects them against the vocabulary before a request runs)."""
    vocab = logits.shape[1]
    r, c, v = [], [], []
    for i, pairs in enumerate(biases):
        for token, bias in pairs:
            if 0 <= token < vocab:
                r.append(i), c.append(token), v.append(bias)
    if r:
        dev = logits.device
        logits.index_put_((torch.tensor(r, device=dev), torch.tensor(c, device=dev)),
                          torch.tensor(v, dtype=logits.dtype, device=dev), accumulate=True)


def ban_tokens(logits: torch.Tensor, banned: list[Sequence[int]]) -> None:
    """In place: banned ids of each row at -inf (min_tokens keeps eos and stop tokens out)."""
    vocab = logits.shape[1]
    r, c = [], []
    for i, ids in enumerate(banned):
        for token in ids:
            if 0 <= token < vocab:
                r.append(i), c.append(token)
    if r:
        dev = logits.device
        logits[torch.tensor(r, device=dev), torch.tensor(c, device=dev)] = -math.inf


def _id_tensor(ids: Sequence[int], vocab: int) -> torch.Tensor:
    t = torch.as_tensor(list(ids), dtype=torch.long)
    return t[(t >= 0) & (t < vocab)]


def apply_repetition_penalty(logits: torch.Tensor, penalties: list[float], histories: list[Sequence[int]]) -> None:
    """In place, for every token seen in the row's prompt or output (each once, however often):
    positive logits are divided by the penalty, negative ones multiplied (HF/vLLM/CTRL semantics)."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and len(histories[i])]
    if not rows:
        return
    vocab = logits.shape[1]
    seen = torch.zeros((len(rows), vocab), dtype=torch.bool)
    for j, i in enumerate(rows):
        seen[j, _id_tensor(histories[i], vocab)] = True
    seen = seen.to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    penalty = torch.tensor([penalties[i] for i in rows], dtype=sub.dtype, device=sub.device)[:, None]
    penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits.index_copy_(0, index, torch.where(seen, penalised, sub))


def apply_output_penalties(logits: torch.Tensor, frequency: list[float], presence: list[float],
                           outputs: list[Sequence[int]]) -> None:
    """In place, OpenAI semantics over the OUTPUT tokens only:
    logit[t] -= frequency * count(t) + presence * (count(t) > 0)."""
    rows = [i for i in range(len(outputs)) if (frequency[i] != 0.0 or presence[i] != 0.0) and len(outputs[i])]
    if not rows:
        return
    vocab = logits.shape[1]
    counts = torch.stack([torch.bincount(_id_tensor(outputs[i], vocab), minlength=vocab) for i in rows])
    counts = counts.to(device=logits.device, dtype=logits.dtype)
    freq = torch.tensor([frequency[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
    pres = torch.tensor([presence[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index) - freq * counts - pres * (counts > 0).to(logits.dtype)
    logits.index_copy_(0, index, sub)
