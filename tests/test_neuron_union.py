"""How many neurons a step's tokens need together (ffn/union.py): measured on calibration tokens by
`profile`, read by the planner in place of the independent-tokens estimate."""

import numpy as np
import pytest
import torch

from hf_factory import save_hf_model
from offbatch.engine.reference import ReferenceModel
from offbatch.ffn.neurons import NeuronStats, load_neuron_stats
from offbatch.ffn.union import (UNION_BUCKETS, UNION_TOKENS, independent_union, measured_union,
                                union_table)
from offbatch.models.spec import load_spec
from offbatch.planner.hybrid_ffn import NeuronCosts
from offbatch.tools.activity import load_stats, profile


def _activity(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) ** 3 * 0.6, g


def test_independent_tokens_measure_the_independent_union():
    q, g = _activity(1500, 0)
    masks = torch.rand(512, q.numel(), generator=g) < q
    table = union_table(masks, q).numpy()
    curve = np.sort(q.numpy())[::-1]
    for hot in (0, 150, 700):
        for t in (1, 4, 16, 64):
            want = independent_union(curve, hot, np.array([t]))[0]
            assert measured_union(table, curve, hot, np.array([t]))[0] == pytest.approx(want, rel=0.08), (hot, t)


def test_tokens_that_share_their_neurons_need_no_more_than_one_token():
    q, g = _activity(800, 1)
    one = torch.rand(1, q.numel(), generator=g) < q
    table = union_table(one.expand(300, -1), q).numpy()
    curve = np.sort(q.numpy())[::-1]
    got = measured_union(table, curve, 0, np.array([1, 8, 64, 256]))
    assert np.allclose(got, int(one.sum()))
    # Past the largest measured T the union grows as independence would from there, never below the measure.
    far = measured_union(table, curve, 0, np.array([2048]))[0]
    assert int(one.sum()) <= far <= independent_union(curve, 0, np.array([2048]))[0]
    # The hot set takes the most active neurons out of it: ranks from `hot` on.
    order = q.argsort(descending=True, stable=True)
    for hot in (0, 80, 400):
        cold_active = int(one[0, order[hot:]].sum())
        bucket = hot / q.numel() * UNION_BUCKETS
        if bucket == int(bucket):
            assert measured_union(table, curve, hot, np.array([16]))[0] == pytest.approx(cold_active)


def test_a_table_row_past_the_sampled_tokens_is_nan():
    q, g = _activity(100, 2)
    table = union_table(torch.rand(40, 100, generator=g) < q, q)
    assert table.shape == (len(UNION_TOKENS), UNION_BUCKETS + 1)
    for t, tokens in enumerate(UNION_TOKENS):
        assert torch.isnan(table[t]).all() == (tokens > 40)
    assert (table[0, 0] > 0) and table[0, -1] == 0  # the last bucket starts past the last neuron


def test_profile_measures_the_union_and_the_planner_reads_it(tmp_path):
    folder = tmp_path / "opt"
    save_hf_model("opt", folder)
    model = ReferenceModel.load(folder, dtype="float32")
    g = torch.Generator().manual_seed(3)
    windows = [torch.randint(3, 120, (64,), generator=g).tolist() for _ in range(6)]
    stats = profile(model, windows, sparsity=0.9)
    spec = load_spec(folder)
    assert set(stats.union) == {f"layers.{i}.down" for i in range(spec.num_layers)}  # dense FFNs only
    t1 = stats.union["layers.0.down"][0]
    # One token's union is its activity: the mean activity over the ranks, measured on the kept tokens.
    assert float(t1[0]) == pytest.approx(float(stats.activity["layers.0.down"].mean()), rel=0.25)
    path = stats.save(tmp_path / "stats.safetensors")
    back = load_stats(path)
    assert all(torch.allclose(back.union[n], stats.union[n], equal_nan=True) for n in stats.union)
    neurons = load_neuron_stats(path, None)
    assert set(neurons.union) == set(range(spec.num_layers))
    costs = NeuronCosts.of(neurons, spec, 4)
    assert costs.union_table is not None
    curve = costs.curve
    for t in (1, 8, 64):
        got = costs.union(0, np.array([t]))[0]
        assert got == pytest.approx(measured_union(costs.union_table, curve, 0, np.array([t]))[0])
    # Statistics written without a union (older files): the independent estimate.
    older = NeuronStats(neurons.activity, oracle=True)
    plain = NeuronCosts.of(older, spec, 4)
    assert plain.union_table is None
    assert plain.union(0, np.array([8]))[0] == pytest.approx(independent_union(curve, 0, np.array([8]))[0])


def test_correlated_tokens_price_a_cheaper_hybrid_step():
    """The planner's cold bytes for a step follow the measured union: tokens that share their active
    neurons make a many-token step cheaper than independence says (the synthetic OPT-30B: 6.6% against 39%
    of the cold neurons at 32 tokens), times the predictors' inflation, at most every cold neuron."""
    q, g = _activity(1000, 4)
    base = torch.rand(1, 1000, generator=g) < q
    noise = torch.rand(512, 1000, generator=g) < q * 0.1
    masks = base | noise
    table = union_table(masks, q)
    stats = NeuronStats({0: q, 1: q}, oracle=True, union={0: table, 1: table})

    class Spec:
        intermediate_size = 1000
        hidden_size = 64
        gated_ffn = False

    from offbatch.planner import hybrid_ffn

    orig = hybrid_ffn.neuron_bytes
    hybrid_ffn.neuron_bytes = lambda spec, dsize: 2 * spec.hidden_size * dsize
    try:
        measured = NeuronCosts.of(stats, Spec, 2)
        independent = NeuronCosts.of(NeuronStats({0: q, 1: q}, oracle=True), Spec, 2)
    finally:
        hybrid_ffn.neuron_bytes = orig
    assert measured.union(100, np.array([32]))[0] < 0.6 * independent.union(100, np.array([32]))[0]
    inflated = NeuronCosts(measured.curve, 1, 0, 3.0, measured.union_table)
    assert inflated.union(100, np.array([32]))[0] == pytest.approx(min(900, 3 * measured.union(100, np.array([32]))[0]))
    assert inflated.union(0, np.array([100000]))[0] <= 1000
