"""The hybrid FFN's arithmetic (ffn/hybrid_mlp.py): hot and cold partial sums add up to the dense FFN with
an exact activity oracle on ReLU FFNs; a predictor's misses are what it loses."""

import pytest
import torch

from hf_factory import save_hf_model
from offbatch.engine.reference import ReferenceModel
from offbatch.ffn.hybrid_mlp import hybrid_ffn, oracle_activity, partial_ffn, split_by_activity
from offbatch.models import layers as L


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    from typer.testing import CliRunner

    from offbatch.cli.main import app

    path = tmp_path_factory.mktemp("opt") / "m"
    r = CliRunner().invoke(app, ["synth", "opt", str(path), "--intermediate-size", "512", "--ffn-activity",
                                 "hot=0.2,sparsity=0.9", "--quiet"])
    assert r.exit_code == 0, r.output
    return ReferenceModel.load(path, dtype="float32")


def ffn_input(model, layer=0, tokens=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = model.modules[(layer, "ffn")]
    x = torch.randn(tokens, model.spec.hidden_size, generator=g)
    return L.norm(x, w, "ffn_norm", model.spec), w


@pytest.mark.parametrize("hot_count", [0, 1, 100, 512])
def test_hot_plus_oracle_cold_equals_the_dense_relu_ffn(opt, hot_count):
    h, w = ffn_input(opt)
    dense = L.mlp(h, w, opt.spec)
    activity = torch.rand(512, generator=torch.Generator().manual_seed(1))
    hot, cold = split_by_activity(activity, hot_count)
    assert hot.numel() == hot_count and torch.equal(torch.cat([hot, cold]).sort().values, torch.arange(512))
    active = oracle_activity(h, w, opt.spec, cold)
    assert cold.numel() == 0 or active.float().mean() < 0.3  # planted: most cold activations are 0
    got = hybrid_ffn(h, w, opt.spec, hot, cold, active)
    assert torch.allclose(got, dense, rtol=1e-5, atol=1e-5)


def test_a_missed_active_neuron_is_what_the_predictor_loses(opt):
    h, w = ffn_input(opt, layer=1, seed=3)
    hot, cold = split_by_activity(torch.arange(512, dtype=torch.float32), 64)
    active = oracle_activity(h, w, opt.spec, cold)
    t, j = active.nonzero()[0].tolist()
    missed = active.clone()
    missed[t, j] = False  # the predictor misses one (token, neuron)
    full = hybrid_ffn(h, w, opt.spec, hot, cold, active)
    got = hybrid_ffn(h, w, opt.spec, hot, cold, missed)
    lost = partial_ffn(h[t : t + 1], w, opt.spec, cold[j : j + 1])
    assert torch.allclose(full[t] - got[t], lost[0], rtol=1e-4, atol=1e-5)
    others = torch.arange(h.shape[0]) != t
    assert torch.equal(full[others], got[others])  # the other tokens are untouched


def test_a_gated_silu_ffn_is_exact_only_with_every_neuron(tmp_path):
    # SiLU is never exactly 0: the oracle marks every neuron active and the split is then the dense FFN.
    save_hf_model("llama", tmp_path / "l")
    model = ReferenceModel.load(tmp_path / "l", dtype="float32")
    h, w = ffn_input(model)
    n = w["up.weight"].shape[0]
    hot, cold = split_by_activity(torch.rand(n), n // 4)
    active = oracle_activity(h, w, model.spec, cold)
    assert active.all()
    assert torch.allclose(hybrid_ffn(h, w, model.spec, hot, cold, active), L.mlp(h, w, model.spec), rtol=1e-5, atol=1e-5)
