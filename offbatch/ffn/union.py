"""How many of a layer's neurons a step of T tokens needs, measured on calibration tokens rather than assumed.

A hybrid FFN step computes the union of the neurons active for any of its T tokens. Taking each token's
activity as independent, a neuron of activity p is needed with probability 1 - (1 - p)^T; tokens whose hidden
states are alike share their active neurons and need fewer (the synthetic OPT-30B's decode steps computed 6.6%
of its cold neurons at 32 tokens where independence gives 39%; its calibration tokens, though, were as
independent: BENCHMARKS.md, twelfth session). The table here is the union itself, measured over random draws
of T calibration tokens (from anywhere in the calibration, as a decode step's tokens come from different
sequences), by activity rank - as alike as the calibration text's tokens are, no more: entry [t, j] is the
share of the layer's neurons with rank >= j / UNION_BUCKETS (most active first) that are active in at least
one of UNION_TOKENS[t] tokens. A table row whose T exceeds the sampled tokens is NaN.
"""

from __future__ import annotations

import numpy as np
import torch

UNION_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNION_BUCKETS = 16  # hot-set sizes are read between these rank quantiles (linear interpolation)
UNION_DRAWS = 16  # random token sets averaged per T
UNION_ROWS = 512  # calibration tokens kept per layer to draw from


def union_table(masks: torch.Tensor, activity: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """masks: bool [rows, neurons], each row a calibration token's active neurons; activity: [neurons], the
    ranking (the hot set is its most active). -> float32 [len(UNION_TOKENS), UNION_BUCKETS + 1]."""
    rows, n = masks.shape
    order = activity.float().argsort(descending=True, stable=True)
    by_rank = masks[:, order]
    bounds = [round(j * n / UNION_BUCKETS) for j in range(UNION_BUCKETS + 1)]
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((len(UNION_TOKENS), UNION_BUCKETS + 1), float("nan"))
    for t, tokens in enumerate(UNION_TOKENS):
        if tokens > rows or n == 0:
            break
        hits = torch.zeros(n)
        draws = 1 if tokens == rows else UNION_DRAWS
        for _ in range(draws):
            pick = torch.randperm(rows, generator=gen)[:tokens]
            hits += by_rank[pick].any(0).float()
        # From each rank on: the expected number of those neurons in the union.
        from_rank = torch.cat([(hits / draws).flip(0).cumsum(0).flip(0), torch.zeros(1)])
        out[t] = torch.tensor([float(from_rank[b]) / n for b in bounds])
    return out


def independent_union(curve: np.ndarray, hot: int, tokens: np.ndarray) -> np.ndarray:
    """Expected cold neurons (ranks >= hot of `curve`, activities descending) for steps of `tokens` tokens,
    each token's activity independent."""
    q = curve[hot:]
    t = np.asarray(tokens, dtype=np.float64)
    grid = np.unique(np.concatenate([[0.0], np.ceil(t.ravel())]))
    table = np.array([np.sum(1.0 - (1.0 - q) ** g) for g in grid])
    return np.interp(t, grid, table)


def measured_union(table: np.ndarray, curve: np.ndarray, hot: int, tokens: np.ndarray) -> np.ndarray:
    """Expected cold neurons from a measured table (union_table's, or a mean of them), for steps of `tokens`
    tokens: read at the hot set's rank, between measured T on a log scale; beyond the largest measured T, the
    independent estimate scaled by the measured/independent ratio there. curve: the descending activity the
    table's ranks follow (for the extrapolation)."""
    n = curve.shape[0]
    hot = max(0, min(hot, n))
    at_rank = np.array([np.interp(hot / n * UNION_BUCKETS, np.arange(UNION_BUCKETS + 1), row) * n for row in table])
    valid = ~np.isnan(at_rank)
    ts = np.asarray(UNION_TOKENS, dtype=np.float64)[valid]
    us = at_rank[valid]
    t = np.asarray(tokens, dtype=np.float64)
    if us.size == 0:
        return independent_union(curve, hot, t)
    # U(0) = 0; log-linear between measured T.
    x = np.log2(np.maximum(t, 1.0))
    inside = np.interp(x, np.log2(ts), us) * np.minimum(t, 1.0)
    last_t, last_u = ts[-1], us[-1]
    if not (t > last_t).any():
        return inside
    ref = independent_union(curve, hot, np.array([last_t]))[0]
    beyond = independent_union(curve, hot, t) * (last_u / ref if ref > 0 else 1.0)
    return np.where(t > last_t, np.maximum(beyond, last_u), inside)


__all__ = ["UNION_TOKENS", "UNION_BUCKETS", "UNION_DRAWS", "UNION_ROWS", "union_table", "independent_union",
           "measured_union"]
