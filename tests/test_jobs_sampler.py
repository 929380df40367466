"""offbatch/engine/sampler.py: each filter's semantics, the draw's distribution, and batch-independence."""

import math

import pytest
import torch

from offbatch.engine.api import SamplingParams
from offbatch.engine.sampler import apply_repetition_penalty, make_rng, sample_next


def P(**kw) -> SamplingParams:
    return SamplingParams(**{"seed": 1234, **kw})


def draws(logits_row, params, n, seed=0):
    """n draws for one request from a fixed distribution."""
    rng = make_rng(params, seed)
    return [sample_next(logits_row[None, :].clone(), [params], [rng], [[]])[0] for _ in range(n)]


def test_greedy_is_argmax_and_needs_no_rng():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert make_rng(P(temperature=0.0), 7) is None
    assert sample_next(logits, [P(), P()], [None, None], [[], []]) == [1, 0]


def test_rng_seeded_from_params_else_fallback():
    a = make_rng(P(temperature=1.0, seed=5), 99)
    b = make_rng(P(temperature=1.0, seed=5), 1)
    c = make_rng(P(temperature=1.0, seed=None), 5)
    d = make_rng(P(temperature=1.0, seed=None), 6)
    x = [torch.rand(3, generator=g).tolist() for g in (a, b, c, d)]
    assert x[0] == x[1] == x[2] and x[3] != x[0]
    # Negative and 64-bit seeds are accepted (folded into manual_seed's range).
    assert make_rng(P(temperature=1.0, seed=-1), 0) is not None
    assert make_rng(P(temperature=1.0, seed=2**64 - 1), 0) is not None


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    apply_repetition_penalty(logits, [2.0], [[0, 1, 1, 1]])  # repeats count once
    assert logits.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    # It also applies to greedy rows: the penalised token loses the argmax.
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sample_next(logits, [P(repetition_penalty=2.0)], [None], [[0]]) == [1]
    assert sample_next(logits, [P(repetition_penalty=1.0)], [None], [[0]]) == [0]


def test_temperature_sampling_matches_softmax():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    n = 4000
    got = torch.bincount(torch.tensor(draws(logits, P(temperature=1.0), n)), minlength=4).double() / n
    assert torch.allclose(got, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.03)
    # Temperature 0.5 squares the odds: p ~ [0.25, 0.09, ...] renormalised.
    sharp = torch.softmax(logits / 0.5, 0).double()
    got = torch.bincount(torch.tensor(draws(logits, P(temperature=0.5), n)), minlength=4).double() / n
    assert torch.allclose(got, sharp, atol=0.03)


def test_top_k_top_p_min_p_never_pick_removed_tokens():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04]))
    assert set(draws(logits, P(temperature=1.0, top_k=2), 500)) == {0, 1}
    # top_p 0.65: 0.4 < 0.65, 0.4+0.3 >= 0.65 -> keep {0, 1}; top_p 0.71 -> {0, 1, 2}.
    assert set(draws(logits, P(temperature=1.0, top_p=0.65), 500)) == {0, 1}
    assert set(draws(logits, P(temperature=1.0, top_p=0.71), 500)) == {0, 1, 2}
    # min_p 0.45: keep p >= 0.18 -> {0, 1, 2}; min_p 0.9 -> {0}.
    assert set(draws(logits, P(temperature=1.0, min_p=0.45), 500)) == {0, 1, 2}
    assert set(draws(logits, P(temperature=1.0, min_p=0.9), 50)) == {0}
    # top_k 1 is greedy whatever the temperature.
    assert set(draws(logits, P(temperature=5.0, top_k=1), 50)) == {0}


def test_top_p_renormalises_kept_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    got = torch.bincount(torch.tensor(draws(logits, P(temperature=1.0, top_p=0.8), 3000)), minlength=3).double() / 3000
    assert torch.allclose(got, torch.tensor([0.625, 0.375, 0.0], dtype=torch.float64), atol=0.03)


def test_one_draw_per_step_so_streams_are_reproducible():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    a = draws(logits[0], P(temperature=1.0, seed=3), 30)
    b = draws(logits[0], P(temperature=1.0, seed=3), 30)
    c = draws(logits[0], P(temperature=1.0, seed=4), 30)
    assert a == b and a != c


def test_batch_independence():
    """A request's tokens are the same alone and inside a batch of others with other parameters."""
    gen = torch.Generator().manual_seed(0)
    steps, vocab = 40, 300
    mine = P(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=42)
    others = [P(temperature=t, top_p=tp, top_k=k, min_p=mp, seed=s)
              for t, tp, k, mp, s in [(1.0, 1.0, 0, 0.0, 1), (0.0, 1.0, 0, 0.0, 2), (1.5, 0.5, 5, 0.1, 3),
                                      (0.7, 0.95, 0, 0.05, 4)]]
    all_logits = torch.randn(steps, 1 + len(others), vocab, generator=gen) * 3

    alone_rng, alone_hist, alone = make_rng(mine, 0), [1, 2, 3], []
    for t in range(steps):
        tok = sample_next(all_logits[t, :1], [mine], [alone_rng], [alone_hist])[0]
        alone.append(tok)
        alone_hist.append(tok)

    # Batched: position 2 of 5, rows kept in different orders every step.
    params = others[:2] + [mine] + others[2:]
    rngs = [make_rng(p, i) for i, p in enumerate(params)]
    hists = [[5, 6], [7], [1, 2, 3], [], [9, 9]]
    batched = []
    for t in range(steps):
        row_logits = torch.cat([all_logits[t, 1:3], all_logits[t, :1], all_logits[t, 3:]])
        toks = sample_next(row_logits, params, rngs, hists)
        for h, tok in zip(hists, toks):
            h.append(tok)
        batched.append(toks[2])
    assert batched == alone
    assert len(set(alone)) > 5  # it really sampled


def test_shape_mismatch_and_missing_rng_are_errors():
    with pytest.raises(ValueError):
        sample_next(torch.zeros(2, 4), [P()], [None], [[]])
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 4), [P(temperature=1.0)], [None], [[]])


def test_does_not_modify_callers_logits():
    logits = torch.tensor([[2.0, 1.0]])
    sample_next(logits, [P(repetition_penalty=3.0)], [None], [[0]])
    assert logits.tolist() == [[2.0, 1.0]] and math.isfinite(logits.sum().item())
