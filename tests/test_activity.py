"""`offbatch profile` (tools/activity.py): each FFN neuron's activity over calibration windows, the
per-FFN thresholds of gated SiLU models, the statistics file, and the thresholded model (an exact oracle on
ReLU FFNs)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from hf_factory import save_hf_model
from offbatch.engine.reference import ReferenceModel
from offbatch.errors import InputFileError
from offbatch.models import layers as L
from offbatch.tools.activity import load_stats, profile, thresholded

WINDOWS = [[3, 5, 7, 9, 11, 13, 2, 8, 21, 34], [4, 8, 15, 16, 23, 42, 1, 2, 3, 60, 61]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for family in ("opt", "llama", "mixtral"):
        path = tmp_path_factory.mktemp(family)
        save_hf_model(family, path)
        made[family] = path
    return made


def layer0_activations(model, ids):
    """The first FFN's neuron activations for one window, computed here from the layer's own pieces."""
    spec = model.spec
    caches = [model.new_cache(len(ids))]
    seen = {}

    def grab(key, name, h):
        if key == (0, "ffn"):
            seen["h"] = h.clone()
        return h

    from offbatch.tools.activity import hooked

    hooked(model, grab)
    model.forward(caches, [list(ids)])
    return seen["h"], spec


def test_relu_activity_counts_the_non_zero_activations_and_the_oracle_is_exact(folders):
    model = ReferenceModel.load(folders["opt"], dtype="float32")
    assert model.spec.activation == "relu"
    stats = profile(model, WINDOWS, sparsity=0.9)  # the target does not apply: ReLU is exactly sparse
    assert all(t == 0.0 for t in stats.threshold.values())
    hs = [layer0_activations(ReferenceModel.load(folders["opt"], dtype="float32"), w)[0] for w in WINDOWS]
    want = sum((h != 0).sum(0).float() for h in hs) / sum(h.shape[0] for h in hs)
    assert torch.allclose(stats.activity["layers.0.down"], want)
    assert 0.0 < stats.sparsity() < 1.0
    # Zeroing what is already zero changes nothing: the same logits.
    dense = ReferenceModel.load(folders["opt"], dtype="float32")
    cut = thresholded(ReferenceModel.load(folders["opt"], dtype="float32"), stats)
    a = dense.forward([dense.new_cache(10)], [WINDOWS[0]], all_logits=True)
    b = cut.forward([cut.new_cache(10)], [WINDOWS[0]], all_logits=True)
    assert torch.equal(a, b)


def test_silu_thresholds_hit_the_target_sparsity_on_the_calibration_tokens(folders):
    model = ReferenceModel.load(folders["llama"], dtype="float32")
    stats = profile(model, WINDOWS, sparsity=0.6)
    spec = model.spec
    assert set(stats.activity) == {f"layers.{i}.down" for i in range(spec.num_layers)}
    for name, a in stats.activity.items():
        assert a.shape == (spec.intermediate_size,) and stats.threshold[name] > 0
        assert abs(float(a.mean()) - 0.4) < 0.02, name  # the quantile of every value seen (no sampling here)
    # The thresholded model zeroes the activations at or below the threshold: another product (lossy).
    full, _ = layer0_activations(ReferenceModel.load(folders["llama"], dtype="float32"), WINDOWS[0])
    t = stats.threshold["layers.0.down"]
    cut_model = thresholded(ReferenceModel.load(folders["llama"], dtype="float32"), stats)
    dense = ReferenceModel.load(folders["llama"], dtype="float32")
    a = dense.forward([dense.new_cache(10)], [WINDOWS[0]], all_logits=True)
    b = cut_model.forward([cut_model.new_cache(10)], [WINDOWS[0]], all_logits=True)
    assert not torch.equal(a, b) and (full.abs() <= t).any()


def test_experts_get_their_own_rows_and_the_file_round_trips(folders, tmp_path):
    model = ReferenceModel.load(folders["mixtral"], dtype="float32")
    stats = profile(model, WINDOWS, sparsity=0.5)
    assert any(".experts." in n for n in stats.activity)
    path = stats.save(tmp_path / "s.safetensors")
    back = load_stats(path)
    assert back.threshold == stats.threshold and back.tokens == stats.tokens
    assert all(torch.equal(back.activity[n], stats.activity[n]) for n in stats.activity)
    assert back.meta["target_sparsity"] == 0.5
    (tmp_path / "x.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputFileError, match="not an activity statistics file"):
        load_stats(tmp_path / "x.safetensors")


def test_profile_command_writes_beside_the_model_and_reports_quality(tmp_path):
    from jobs_support import synth_llama

    from offbatch.cli.main import app

    model = synth_llama(tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"the cat {i} sat on mat {i % 7} and ran"}) for i in range(200)) + "\n")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} more{i % 11}." for i in range(2000)))
    args = ["profile", str(model), str(prompts), "--windows", "2", "--window", "64", "--eval-text", str(text),
            "--eval-windows", "1", "--sparsity", "0.7"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    stats = load_stats(model / "offbatch_activity.safetensors")
    assert stats.tokens == 128 and abs(stats.sparsity() - 0.7) < 0.03
    q = stats.meta["quality"]
    assert q["windows"] == 1 and 0 <= q["agreement"] <= 1 and q["perplexity"] > 0
    assert "overall sparsity" in r.output and "greedy agreement" in " ".join(r.output.split())
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in again.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    r = CliRunner().invoke(app, ["profile", str(model), str(bad), "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code != 0 and "no prompt text" in r.output


def test_planted_activity_probabilities_follow_the_asked_shape():
    import numpy as np

    from offbatch.tools.synth import HOT_SHARE, activity_probabilities

    for hot, sparsity in [(0.2, 0.9), (0.1, 0.95), (0.3, 0.7)]:
        p = activity_probabilities(4096, hot, sparsity, np.random.default_rng(0))
        assert abs(p.mean() - (1 - sparsity)) < 1e-9 and p.max() <= 0.99 + 1e-12 and p.min() > 0
        s = np.sort(p)[::-1]
        assert abs(s[: round(hot * 4096)].sum() / s.sum() - HOT_SHARE) < 0.02
    with pytest.raises(Exception, match="nearly always"):
        activity_probabilities(4096, 0.1, 0.5, np.random.default_rng(0))  # 10% of neurons, 40% of all tokens


def test_synth_plants_ffn_activity_that_profile_measures(tmp_path):
    from safetensors.torch import load_file

    from offbatch.cli.main import app
    from offbatch.models.spec import load_spec
    from offbatch.tools.synth import synth_tensor

    out = tmp_path / "opt"
    r = CliRunner().invoke(app, ["synth", "opt", str(out), "--intermediate-size", "1024", "--ffn-activity",
                                 "hot=0.2,sparsity=0.9", "--quiet"])
    assert r.exit_code == 0, r.output
    spec = load_spec(out)
    assert spec.synth_ffn_activity == (0.2, 0.9)
    # The folder holds what the in-memory synth source (bench --synth) generates.
    t = load_file(str(out / "model.safetensors"))
    assert torch.equal(t["model.decoder.layers.1.fc1.bias"], synth_tensor(spec, "model.decoder.layers.1.fc1.bias"))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 97} x{i % 13}" for i in range(3000)))
    r = CliRunner().invoke(app, ["profile", str(out), str(text), "--windows", "4", "--window", "128", "--no-eval",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    stats = load_stats(out / "offbatch_activity.safetensors")
    assert abs(stats.sparsity() - 0.9) < 0.04
    for bad, match in [(["llama", str(tmp_path / "l"), "--ffn-activity", "hot=0.2,sparsity=0.9"], "plain ReLU FFN"),
                       (["opt", str(tmp_path / "o"), "--ffn-activity", "hot=2"], "each between 0 and 1")]:
        r = CliRunner().invoke(app, ["synth", *bad])
        assert r.exit_code != 0 and match in r.output, r.output


def test_bad_outputs_and_an_empty_activity_are_one_clear_error(tmp_path):
    from jobs_support import synth_llama

    from offbatch.cli.main import app

    model = synth_llama(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(2000)))
    for out, match in [(tmp_path / "no" / "dir" / "s.safetensors", "is not a folder"), (tmp_path, "is a folder")]:
        for cmd in ("profile", "train-predictors"):
            r = CliRunner().invoke(app, [cmd, str(model), str(text), "-o", str(out), "--windows", "1", "--window", "64",
                                         "--overwrite"])
            assert r.exit_code != 0 and match in r.output, (cmd, r.output)
    r = CliRunner().invoke(app, ["synth", "opt", str(tmp_path / "o"), "--ffn-activity", "", "--quiet"])
    assert r.exit_code != 0 and "give hot=H,sparsity=S" in r.output and not (tmp_path / "o").exists()
