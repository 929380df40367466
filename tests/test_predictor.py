"""`offbatch train-predictors` (tools/predictor.py): what a predictor is trained on (the activity `profile`
counts), how well it predicts on tokens it never saw, and its file."""

import pytest
import torch
from typer.testing import CliRunner

from offbatch.engine.reference import ReferenceModel
from offbatch.errors import InputFileError
from offbatch.tools.activity import profile
from offbatch.tools.predictor import collect, load_predictors, train_one


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny OPT with 90% planted activity (ReLU FFNs with biases), and calibration text."""
    from offbatch.cli.main import app

    root = tmp_path_factory.mktemp("planted")
    r = CliRunner().invoke(app, ["synth", "opt", str(root / "m"), "--intermediate-size", "1024", "--ffn-activity",
                                 "hot=0.2,sparsity=0.9", "--quiet"])
    assert r.exit_code == 0, r.output
    text = root / "t.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13} y{i % 31}" for i in range(4000)))
    return root / "m", text


def test_collect_gives_the_inputs_and_the_activity_profile_counts(planted):
    model_dir, _ = planted
    windows = [list(range(3, 131)), list(range(200, 328))]
    stats = profile(ReferenceModel.load(model_dir, dtype="float32"), windows, 0.5)
    data = collect(ReferenceModel.load(model_dir, dtype="float32"), windows, stats.threshold)
    assert set(data) == set(stats.activity)
    for name, (x, y) in data.items():
        assert x.shape[0] == y.shape[0] == 256 and y.dtype == torch.bool
        assert torch.allclose(y.float().mean(0), stats.activity[name])


def test_trained_predictors_keep_their_recall_on_unseen_tokens_and_round_trip(planted, tmp_path):
    from offbatch.cli.main import app

    model_dir, text = planted
    out = tmp_path / "p.safetensors"
    r = CliRunner().invoke(app, ["train-predictors", str(model_dir), str(text), "-o", str(out), "--windows", "8",
                                 "--window", "128", "--recall", "0.9", "--rank", "32", "--epochs", "10"])
    assert r.exit_code == 0, r.output
    assert "recall" in r.output
    preds = load_predictors(out)
    assert len(preds) == 2
    assert all(p.c is not None and p.c.shape == (32,) for p in preds.values())  # the hidden bias round-trips
    for name, p in preds.items():
        m = p.metrics
        assert m["recall"] > 0.8, (name, m)  # cut for 0.9 on one split, measured on another
        assert m["predicted_sparsity"] > 0.6 and abs(m["sparsity"] - 0.9) < 0.05, (name, m)
    again = CliRunner().invoke(app, ["train-predictors", str(model_dir), str(text), "-o", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    with pytest.raises(InputFileError, match="not a predictors file"):
        load_predictors(tmp_path / "x.safetensors")


def test_a_predictor_learns_a_planted_rule():
    # Neuron j is active where x . w_j is above 1.3 of its spread (a rank-8 rule, about 10% active): a rank-16
    # predictor finds it.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 8, generator=g) @ torch.randn(8, 32, generator=g)
    x = torch.randn(4000, 32, generator=g)
    y = (x @ w.T) > 1.3 * w.norm(dim=1)
    p = train_one(x, y, rank=16, recall=0.9, epochs=10)
    assert abs(p.metrics["sparsity"] - 0.9) < 0.03
    # Without learning, keeping 90% recall would mean predicting about 90% of the neurons active.
    assert p.metrics["recall"] > 0.85 and p.metrics["predicted_sparsity"] > 0.5, p.metrics
    assert torch.equal(p.active(x[:5]), p.logits(x[:5]) > p.cut)


def test_a_model_without_dense_ffns_is_refused(tmp_path):
    from offbatch.cli.main import app

    assert CliRunner().invoke(app, ["synth", "mixtral", str(tmp_path / "moe"), "--quiet"]).exit_code == 0
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(3000)))
    r = CliRunner().invoke(app, ["train-predictors", str(tmp_path / "moe"), str(text), "--window", "64", "--windows", "2"])
    assert r.exit_code != 0 and "no dense FFN" in r.output, r.output
