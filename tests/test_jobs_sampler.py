"""offbatch/engine/sampler.py and sequence.py: each filter's and penalty's semantics, logprobs, non-finite
logits, min_tokens, the draw's distribution, and batch-independence. (The real engines run every
request field end to end in test_request_surface.py.)"""

import math

import pytest
import torch

from offbatch.engine.api import GenRequest, SamplingParams
from offbatch.engine.sampler import Pick, Row, apply_repetition_penalty, make_rng, sample_next, sample_rows
from offbatch.engine.sequence import SeqState


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


def test_engine_logits_made_under_inference_mode_are_only_read():
    """The original crash: min_tokens wrote -inf into logits the engine made under inference_mode. Every
    feature that changes logits now works on the sampler's copy."""
    with torch.inference_mode():
        logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 1.0, 4.0, 2.0]])
    before = logits.clone()
    p = P(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5,
          logit_bias=((0, 1.0),), logprobs=2)
    rows = [Row(p, make_rng(p, 0), [1], [2, 2], banned=[1]), Row(P(), None, [], [], banned=[2])]
    picks = sample_rows(logits, rows)
    assert torch.equal(logits, before)
    assert picks[1].token == 3  # 2 is banned: the next best
    assert picks[0].token != 1 and picks[0].logprob is not None


def test_logit_bias_is_added_before_everything():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    assert sample_rows(logits, [Row(P(logit_bias=((2, 4.5),)))])[0].token == 2  # 1 + 4.5 > 5
    assert sample_rows(logits, [Row(P(logit_bias=((2, 3.5),)))])[0].token == 1
    # A negative bias removes the favourite; ids outside the logits are skipped, never an IndexError.
    assert sample_rows(logits, [Row(P(logit_bias=((1, -100.0), (7, 9.0))))])[0].token == 2
    # Before the repetition penalty: the biased value is what gets divided (6 / 3 = 2 < 2.5).
    assert sample_rows(torch.tensor([[2.5, 2.0]]), [Row(P(logit_bias=((1, 4.0),), repetition_penalty=3.0),
                                                       prompt=[1])])[0].token == 0


def test_presence_and_frequency_penalties_are_openai_semantics_over_output_only():
    logits = torch.tensor([[4.0, 3.5, 3.0, 0.0]])
    # Token 0 came out twice: 4 - 2*0.3 - 0.1 = 3.3 < 3.5, so token 1 wins.
    p = P(frequency_penalty=0.3, presence_penalty=0.1)
    assert sample_rows(logits, [Row(p, output=[0, 0, 3])])[0].token == 1
    # Once: 4 - 0.3 - 0.1 = 3.6 > 3.5: token 0 stays.
    assert sample_rows(logits, [Row(p, output=[0, 3])])[0].token == 0
    # The prompt does not count (OpenAI: "so far" in the completion).
    assert sample_rows(logits, [Row(p, prompt=[0, 0, 0, 0], output=[])])[0].token == 0
    # Negative values reward repeats.
    assert sample_rows(logits, [Row(P(presence_penalty=-2.0), output=[2])])[0].token == 2
    # After the repetition penalty (vLLM's order): token 0's -1 becomes -1*2 - 0.4 = -2.4 > -2.5, so it
    # wins; the other order would give (-1 - 0.4)*2 = -2.8 and token 1.
    x = torch.tensor([[-1.0, -2.5]])
    assert sample_rows(x, [Row(P(repetition_penalty=2.0, frequency_penalty=0.4), output=[0])])[0].token == 0


def test_logprobs_are_log_softmax_of_raw_logits_with_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    expected = logits.log_softmax(1)[0]
    for params in (P(logprobs=3), P(logprobs=3, temperature=2.0, seed=1), P(logprobs=3, logit_bias=((1, 50.0),)),
                   P(logprobs=3, repetition_penalty=5.0, frequency_penalty=2.0)):
        rng = make_rng(params, 0)
        pick = sample_rows(logits, [Row(params, rng, prompt=[4], output=[4, 4])])[0]
        lp = pick.logprob
        assert lp.token_id == pick.token
        assert lp.logprob == pytest.approx(expected[pick.token].item(), abs=1e-6)  # raw: before bias, penalty, T
        assert [t for t, _ in lp.top] == [4, 0, 1]
        assert [v for _, v in lp.top] == pytest.approx(expected[[4, 0, 1]].tolist(), abs=1e-6)
    assert sample_rows(logits, [Row(P(logprobs=0))])[0].logprob.top == []
    assert sample_rows(logits, [Row(P())])[0].logprob is None
    assert len(sample_rows(logits, [Row(P(logprobs=20))])[0].logprob.top) == 5  # at most the vocabulary


def test_non_finite_rows_fail_alone():
    good = torch.tensor([0.0, 2.0, 1.0, -math.inf])  # a -inf entry alone is a legal mask
    rows = torch.stack([good, torch.tensor([0.0, math.nan, 1.0, 2.0]), good,
                        torch.tensor([0.0, math.inf, 1.0, 2.0]), torch.full((4,), -math.inf)])
    p = P(temperature=1.0, logprobs=1)
    rngs = [make_rng(p, i) for i in range(5)]
    picks = sample_rows(rows, [Row(p, g) for g in rngs])
    assert [pk.token is None for pk in picks] == [False, True, False, True, True]
    assert picks[1].logprob is None and picks[0].logprob is not None
    # The healthy rows drew exactly what they draw alone.
    alone = sample_rows(good[None], [Row(p, make_rng(p, 0))])[0]
    assert (picks[0].token, picks[0].logprob.logprob) == (alone.token, alone.logprob.logprob)


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[1.0, 30.0, 29.0]])
    for t in (1e-300, 1e-6):
        p = P(temperature=t)
        assert make_rng(p, 0) is None
        assert sample_rows(logits, [Row(p)])[0].token == 1


def seq(**kw) -> SeqState:
    params = P(**kw)
    return SeqState(GenRequest(0, [5, 6], params), make_rng(params, 0))


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    s = seq(min_tokens=2, stop_token_ids=(7,))
    assert set(s.banned(eos_ids=(2, 0))) == {7, 2, 0}
    assert s.advance(Pick(4), (2, 0), 100, 0.0) is None
    assert set(s.banned((2, 0))) == {7, 2, 0}
    assert s.advance(Pick(4), (2, 0), 100, 0.0) is None
    assert s.banned((2, 0)) == ()
    assert seq(min_tokens=3, ignore_eos=True).banned((2,)) == ()
    # The sampler honours the ban: eos is the favourite, yet the next best comes out.
    s = seq(min_tokens=1)
    logits = torch.tensor([[0.0, 0.0, 9.0, 1.0]])
    assert sample_rows(logits, [s.sampling_row((2,))])[0].token == 3


def test_logprobs_trimmed_with_the_closing_eos_and_errors_carry_the_message():
    from offbatch.engine.api import TokenLogprob

    s = seq(logprobs=1)
    assert s.advance(Pick(4, TokenLogprob(4, -0.5)), (2,), 100, 0.0) is None
    out = s.advance(Pick(2, TokenLogprob(2, -0.1)), (2,), 100, 0.0)
    assert out.token_ids == [4] and [lp.token_id for lp in out.logprobs] == [4] and out.finish_reason == "stop"
    s = seq()
    s.advance(Pick(4), (2,), 100, 0.0)
    out = s.advance(Pick(None), (2,), 100, 0.0)
    assert out.finish_reason == "error" and out.token_ids == [4] and out.logprobs is None
    assert out.error == ("the model produced non-finite logits (NaN/Inf) at token 2: its weights or the compute "
                         "dtype are broken")


def test_rows_sampled_in_chunks_give_what_one_call_gives(monkeypatch):
    # A wave's logits are sampled a few rows at a time (the copies of 1 024 rows x 128k would not fit a
    # capped GPU): greedy, seeded sampling, logprobs, penalties, bans and a non-finite row, chunked or not.
    from offbatch import plan

    torch.manual_seed(0)
    V = 50
    logits = torch.randn(11, V) * 3
    logits[4, 7] = float("nan")
    params = [P(), P(temperature=0.8, top_p=0.9, seed=3), P(temperature=1.2, top_k=5, seed=4, logprobs=2),
              P(repetition_penalty=1.3), P(), P(temperature=0.7, min_p=0.05, seed=9), P(logprobs=0),
              P(temperature=1.0, seed=11, frequency_penalty=0.5), P(), P(temperature=0.9, seed=1), P()]

    def rows():
        return [Row(p, make_rng(p, i), [1, 2, 3], [5, 5], banned=[2] if i == 8 else ())
                for i, p in enumerate(params)]

    whole = sample_rows(logits, rows())
    monkeypatch.setattr(plan, "SAMPLE_CHUNK_ENTRIES", 3 * V)  # three rows a chunk
    chunked = sample_rows(logits, rows())
    assert [p.token for p in chunked] == [p.token for p in whole] and whole[4].token is None
    assert [p.logprob for p in chunked] == [p.logprob for p in whole] and whole[2].logprob is not None
