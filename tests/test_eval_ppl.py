"""`offbatch eval-ppl`: window arithmetic, perplexity equal to transformers' own cross-entropy over the
same windows, greedy agreement, the CLI's JSON and table, and its errors."""

import inspect
import json
import os
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from jobs_support import synth_llama
from offbatch.cli.main import app
from offbatch.engine.reference import ReferenceModel
from offbatch.models.tokenizer import load_tokenizer
from offbatch.tools.quality import Window, agreement, perplexity, score, windows

runner = CliRunner()
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Offline batches stream weights over PCIe.",
             "A model reads 42 tokens, then 7 more!", "def f(x):\n    return x * 2\n",
             "Perplexity is the exponential of the mean negative log-likelihood."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return synth_llama(tmp_path_factory.mktemp("eval") / "m")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(SENTENCES[(i * 7) % 5] for i in range(40)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ids(folder, text):
    return load_tokenizer(folder).encode(text.read_text(encoding="utf-8"), add_special_tokens=False)


@pytest.fixture(scope="module")
def ref(folder):
    return ReferenceModel.load(folder, dtype="float32")


# ---- windows -----------------------------------------------------------------------------------

def scored_positions(wins, stride):
    """Absolute indices of the tokens each window scores (window k starts at k * stride)."""
    return [k * stride + i for k, w in enumerate(wins) for i in range(w.first, len(w.ids))]


def test_non_overlapping_windows_cover_whole_windows_only():
    wins = windows(list(range(10)), 4)
    assert [w.ids for w in wins] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # the last 2 ids make no whole window
    assert [w.first for w in wins] == [1, 1] and sum(w.scored for w in wins) == 6
    assert windows(list(range(10)), 4, max_windows=1) == [Window((0, 1, 2, 3), 1)]
    assert windows(list(range(3)), 4) == []
    assert windows(list(range(4)), 4) == [Window((0, 1, 2, 3), 1)]


def test_overlapping_windows_score_each_token_once():
    wins = windows(list(range(10)), 4, stride=2)
    assert [w.ids[0] for w in wins] == [0, 2, 4, 6] and [w.first for w in wins] == [1, 2, 2, 2]
    assert scored_positions(wins, 2) == list(range(1, 10))  # every token but the first, once
    wins = windows(list(range(11)), 5, stride=1)
    assert scored_positions(wins, 1) == list(range(1, 11))
    gaps = windows(list(range(10)), 3, stride=5)  # stride > window skips text
    assert [w.ids for w in gaps] == [(0, 1, 2), (5, 6, 7)] and [w.first for w in gaps] == [1, 1]


@pytest.mark.parametrize("args", [dict(window=1), dict(window=4, stride=0), dict(window=4, max_windows=0)])
def test_bad_window_arguments_raise(args):
    with pytest.raises(ValueError):
        windows(list(range(10)), **args)


# ---- perplexity against transformers -------------------------------------------------------------

def hf_nll(folder, wins):
    """Summed NLL and count of the scored tokens, from transformers' own forward and torch's cross-entropy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(torch.tensor([w.ids])).logits[0].float()
            target = torch.tensor(w.ids[w.first :])
            total += F.cross_entropy(logits[w.first - 1 : -1], target, reduction="sum").item()
            count += len(target)
    return total, count


@pytest.mark.parametrize("stride", [None, 24])
def test_perplexity_is_exp_of_mean_nll_from_transformers(folder, ids, ref, stride):
    wins = windows(ids, 48, stride)
    assert len(wins) >= 4
    ppl, nll, tokens = perplexity(ref, wins)
    total, count = hf_nll(folder, wins)
    assert tokens == count == sum(w.scored for w in wins)
    assert nll == pytest.approx(total / count, rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert math.isclose(ppl, math.exp(nll))


def test_agreement_with_itself_is_one_and_a_perturbed_model_disagrees(folder, ids, ref):
    wins = windows(ids, 32, max_windows=4)
    assert agreement(ref, ref, wins) == 1.0
    noisy = ReferenceModel.load(folder, dtype="float32")
    torch.manual_seed(0)
    for mw in noisy.modules.values():
        for t in mw.values():
            t.add_(torch.randn_like(t))
    assert agreement(ref, noisy, wins) < 1.0
    s = score(ref, wins)
    assert [len(g) for g in s.greedy] == [w.scored for w in wins]


# ---- the command ---------------------------------------------------------------------------------

def invoke(*args):
    return runner.invoke(app, ["eval-ppl", *map(str, args)])


def test_cli_json_equals_the_library(folder, text, ids, ref):
    r = invoke(folder, text, "--window", 40, "--stride", 30, "--max-windows", 5, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    wins = windows(ids, 40, 30, 5)
    ppl, nll, tokens = perplexity(ref, wins)
    assert (report["window"], report["stride"], report["windows"]) == (40, 30, 5)
    assert report["text_tokens"] == len(ids) and report["scored_tokens"] == tokens
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    [row] = report["results"]
    assert row["weights"] == "dense" and "agreement" not in row
    assert row["perplexity"] == pytest.approx(ppl, rel=1e-6) and row["nll"] == pytest.approx(nll, rel=1e-6)


def test_cli_table(folder, text):
    r = invoke(folder, text, "--window", 64, "--weights", "dense")
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.stdout and "dense" in r.stdout and "tokens scored" in r.stdout


def _loads_formats() -> bool:
    return "weights" in inspect.signature(ReferenceModel.load).parameters


@pytest.mark.skipif(not _loads_formats(), reason="ReferenceModel.load takes no weights format yet")
def test_cli_compares_a_format_with_dense(folder, text):
    from test_formats import TOY  # an exact toy format: same perplexity, full agreement

    r = invoke(folder, text, "--window", 64, "--weights", TOY.name, "--json")
    assert r.exit_code == 0, r.output
    dense, toy = json.loads(r.stdout)["results"]
    assert (dense["weights"], toy["weights"]) == ("dense", TOY.name)
    assert toy["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-5)
    assert toy["agreement"] == 1.0 and toy["tokens"] == dense["tokens"]


def test_cli_errors(folder, text, tmp_path):
    def fails(code, words, *args):
        r = invoke(*args, *([] if "--window" in args else ["--window", 64]))
        assert r.exit_code == code, r.output
        assert words in r.output, r.output

    fails(3, "no such text file", folder, tmp_path / "missing.txt")
    fails(3, "is a folder", folder, tmp_path)
    os.mkfifo(tmp_path / "fifo")  # would block a plain read
    fails(3, "named pipe", folder, tmp_path / "fifo")
    fails(3, "a device", folder, "/dev/zero")  # would never end
    (tmp_path / "empty.txt").write_text("  \n")
    fails(3, "is empty", folder, tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    fails(3, "not UTF-8", folder, tmp_path / "latin1.txt")
    (tmp_path / "short.txt").write_text("a few words")
    fails(3, "fewer than one --window", folder, tmp_path / "short.txt")
    fails(3, "longer than the model's context", folder, text, "--window", 100000)
    fails(3, "no such model folder", tmp_path / "nomodel", text)
    fails(2, "not a weight format", folder, text, "--weights", "nonsense")
    fails(2, "--window", folder, text, "--window", 1)
    fails(2, "--stride", folder, text, "--stride", 0)
