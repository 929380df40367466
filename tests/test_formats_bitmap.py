"""The bitmap formats (formats/bitmap.py) and pruning (tools/prune.py): what a row keeps, the stored
layout, Wanda's scores, and `offbatch convert --prune` end to end on a small model."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from offbatch.formats import BitmapFormat, get_format
from offbatch.formats.bitmap import kept_per_row
from offbatch.tools.prune import input_norms, wanda_prune


def pruned_by_magnitude(w: torch.Tensor, kept: int) -> torch.Tensor:
    """The plain statement: each row's `kept` largest |w|, the rest zero."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        order = sorted(range(w.shape[1]), key=lambda j: -abs(float(w[r, j])))[:kept]
        out[r, order] = w[r, order]
    return out


@pytest.mark.parametrize("percent", [1, 30, 50, 90, 99])
@pytest.mark.parametrize("n, k", [(1, 8), (5, 13), (16, 100), (3, 257)])
def test_each_row_keeps_its_largest_values_and_nothing_else(percent, n, k):
    g = torch.Generator().manual_seed(percent * 1000 + k)
    w = torch.randn(n, k, generator=g)
    fmt = get_format(f"bitmap-{percent}")
    assert isinstance(fmt, BitmapFormat) and fmt.name == f"bitmap-{percent}"
    c = kept_per_row(k, percent / 100)
    stored = fmt.encode("up.weight", w, torch.float32)
    assert {n_: (tuple(t.shape), t.dtype) for n_, t in stored.items()} == {
        n_: (s, d) for n_, s, d in fmt.stored("up.weight", (n, k), torch.float32)}
    assert stored["up.weight.bits"].shape == (n, -(-k // 8)) and stored["up.weight.nz"].shape == (n, c)
    dense = fmt.dequantize(stored, "up.weight", torch.float32, k)
    assert torch.equal(dense, pruned_by_magnitude(w, c).bfloat16().float())  # kept values in bfloat16
    assert ((dense != 0).sum(1) == c).all()  # the same count in every row: sizes known from shapes alone
    x = torch.randn(4, k, generator=g)
    assert torch.allclose(fmt.linear(x, stored | {"up.bias": torch.ones(n)}, "up"), F.linear(x, dense, torch.ones(n)))


@pytest.mark.parametrize("n, k", [(5, 13), (16, 100)])
def test_int8_values_are_the_kept_values_quantized_per_row(n, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(n, k, generator=g)
    w[1] = 0  # an all-zero row: scale 0, decodes to zeros
    fmt = get_format("bitmap-50-int8")
    assert fmt.name == "bitmap-50-int8" and fmt.int8_values
    stored = fmt.encode("gate.weight", w, torch.float32)
    c = kept_per_row(k, 0.5)
    assert stored["gate.weight.nz"].dtype == torch.int8 and stored["gate.weight.nz"].shape == (n, c)
    assert stored["gate.weight.scale"].shape == (n, 1)
    pruned = pruned_by_magnitude(w, c)
    dense = fmt.dequantize(stored, "gate.weight", torch.float32, k)
    keep = pruned != 0
    assert torch.equal(dense != 0, keep & (dense != 0)) and not dense[~keep].any()  # nothing outside the kept
    scale = pruned.abs().amax(1, keepdim=True) / 127
    assert (dense - pruned).abs().le(scale / 2 + 1e-7).all()  # each kept value within half a step
    assert not dense[1].any()
    # The same positions and bytes as the bf16-valued format, 1 byte a value instead of 2 (plus a scale a row).
    plain = get_format("bitmap-50").encode("gate.weight", w, torch.float32)
    assert torch.equal(plain["gate.weight.bits"], stored["gate.weight.bits"])


def test_int4_values_are_the_kept_values_in_int4_asym_groups():
    from offbatch.formats.bitmap import INT4_VALUES

    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 100, generator=g)
    fmt = get_format("bitmap-50-int4")
    stored = fmt.encode("down.weight", w, torch.float32)
    assert {n: (tuple(t.shape), t.dtype) for n, t in stored.items()} == {
        n: (s, d) for n, s, d in fmt.stored("down.weight", (6, 100), torch.float32)}
    assert set(stored) == {"down.weight.bits", "down.weight.nz.q4", "down.weight.nz.scale", "down.weight.nz.min"}
    plain = get_format("bitmap-50").encode("down.weight", w, torch.float32)
    assert torch.equal(plain["down.weight.bits"], stored["down.weight.bits"])  # the same positions
    # The kept values, quantized as int4-asym-g32 quantizes a [N, C] weight, expanded in place.
    kept = pruned_by_magnitude(w, 50)
    values = kept[kept != 0].view(6, 50)
    want_values = INT4_VALUES.dequantize(INT4_VALUES.encode("v", values, torch.float32), "v", torch.float32, 50)
    dense = fmt.dequantize(stored, "down.weight", torch.float32, 100)
    assert torch.equal(dense[kept != 0].view(6, 50), want_values) and not dense[kept == 0].any()
    assert (dense - kept).abs().max() < 0.2  # 4 bits over a group's range


def test_only_bulk_linear_weights_are_pruned():
    fmt = get_format("bitmap-50")
    assert fmt.compresses("q.weight", (8, 8)) and fmt.compresses("experts.3.down.weight", (8, 8))
    assert not fmt.compresses("router.weight", (4, 8)) and not fmt.compresses("q.bias", (8,))
    assert not fmt.compresses("input_norm.weight", (8,))
    for bad in ("bitmap-0", "bitmap-100", "bitmap-5x", "bitmap"):
        with pytest.raises(KeyError):
            get_format(bad)


def test_wanda_keeps_the_largest_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    norms = torch.tensor([10.0, 1.0, 0.1, 4.0])  # scores row 0: 10, 2, 0.3, 2 -> keeps 0 and (1 or 3)
    out = wanda_prune(w, norms, 2)
    assert out[0, 0] == 1.0 and out[0, 2] == 0 and (out[0] != 0).sum() == 2
    assert torch.equal(out[1], torch.tensor([4.0, 0.0, 0.0, 2.0]))  # 40, 1, 0.1, 8
    # The format then keeps exactly those non-zeros (in bfloat16: these are exact).
    fmt = get_format("bitmap-50")
    assert torch.equal(fmt.dequantize(fmt.encode("up.weight", out, torch.float32), "up.weight", torch.float32, 4), out)
    with pytest.raises(ValueError, match="input norms"):
        wanda_prune(w, norms[:3], 2)


@pytest.mark.parametrize("name", ["bitmap-50", "bitmap-70-int8", "bitmap-50-int4"])
def test_a_weight_encoded_in_row_blocks_is_the_weight_encoded_whole(monkeypatch, name):
    """Conversion encodes (and Wanda scores) a weight in blocks of rows to bound host memory: every stored tensor,
    bit for bit, is what the whole weight encodes to (ragged last block), and Wanda keeps the same values."""
    import offbatch.formats.bitmap as bitmap
    import offbatch.tools.prune as prune

    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 96, generator=g)
    fmt = get_format(name)
    whole = fmt.encode("up.weight", w, torch.float32)
    monkeypatch.setattr(bitmap, "ENCODE_ROWS", 8)
    blocks = fmt.encode("up.weight", w, torch.float32)
    assert whole.keys() == blocks.keys()
    for key in whole:
        assert whole[key].dtype == blocks[key].dtype and torch.equal(whole[key], blocks[key]), key
    norms = torch.rand(96, generator=g) + 0.1
    want = wanda_prune(w, norms, 40)
    monkeypatch.setattr(prune, "PRUNE_ROWS", 5)
    assert torch.equal(wanda_prune(w, norms, 40), want)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from hf_factory import save_hf_model

    path = tmp_path_factory.mktemp("tiny")
    save_hf_model("llama", path)
    return path


def test_input_norms_are_each_linear_layers_input_norms(tiny):
    # Recorded through the forward: every bulk linear layer of every layer, and for the first layer's q
    # projection the norm of what q sees (the normed embeddings) computed here by hand.
    from offbatch.engine.reference import ReferenceModel
    from offbatch.models import layers as L

    ids = [[3, 5, 7, 9, 11], [2, 4, 6]]
    norms = input_norms(tiny, ids, dtype="float32")
    ref = ReferenceModel.load(tiny, dtype="float32")
    spec = ref.spec
    for layer in range(spec.num_layers):
        for name in ("q", "k", "v", "o"):
            assert norms[((layer, "attn"), f"{name}.weight")].shape == (spec.hidden_size if name != "o"
                                                                         else spec.num_heads * spec.head_dim,)
    sq = torch.zeros(spec.hidden_size)
    for seq in ids:
        x = ref.modules[(-1, "embed")]["embed"][torch.tensor(seq)]
        h = L.rms_norm(x, ref.modules[(0, "attn")]["attn_norm.weight"], spec.norm_eps)
        sq += (h.float() ** 2).sum(0)
    assert torch.allclose(norms[((0, "attn"), "q.weight")], sq.sqrt(), rtol=1e-5)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A tiny Llama with its own tokenizer (`offbatch synth`): what convert's quality report needs."""
    from jobs_support import synth_llama

    return synth_llama(tmp_path_factory.mktemp("synth") / "m")


def test_convert_prune_writes_a_bitmap_folder_that_runs_and_reports_quality(synth, tmp_path):
    from offbatch.cli.main import app
    from offbatch.engine.reference import ReferenceModel
    from offbatch.models.loader import open_checkpoint

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and more{i % 11}." for i in range(3000)))
    outs = {}
    for method in ("magnitude", "wanda"):
        out = tmp_path / method
        r = CliRunner().invoke(app, ["convert", str(synth), str(out), "--prune", "0.5", "--method", method,
                                     "--eval-text", str(text), "--eval-windows", "1", "--quiet"])
        assert r.exit_code == 0, r.output
        cfg = json.loads((out / "config.json").read_text())["quantization_config"]
        assert cfg["format"] == "bitmap-50" and cfg["pruned"] == 0.5 and cfg["method"] == method
        rep = json.loads((out / "offbatch_quality.json").read_text())
        assert rep["format"] == "bitmap-50" and 0 <= rep["results"][1]["agreement"] <= 1
        ckpt = open_checkpoint(out)
        q = ckpt.get("layers.0.q.weight")
        assert ((q != 0).sum(1) == kept_per_row(q.shape[1], 0.5)).all()
        outs[method] = q
        ReferenceModel.load(out, dtype="float32").greedy([[3, 5, 7]], 2)  # runs in its format
    assert not torch.equal(outs["magnitude"] != 0, outs["wanda"] != 0)  # the input norms moved the choice
    wanda = json.loads((tmp_path / "wanda" / "config.json").read_text())["quantization_config"]
    assert wanda["calibration"]["windows"] >= 1


@pytest.mark.parametrize("args, match", [
    (["--prune", "0.555"], "whole percent"),
    (["--prune", "0.5", "--weights", "nf4"], "no other format"),
    (["--prune", "0.5", "--group", "32"], "no other format"),
    (["--prune", "0.5", "--calib", "x.txt"], "only --method wanda"),
    (["--prune", "0.5", "--method", "sparsegpt"], "--method takes"),
    (["--prune", "1.5"], "0.99"),
    ([], "give the weight format"),
])
def test_convert_prune_refuses_bad_options_before_any_work(synth, tmp_path, args, match):
    from offbatch.cli.main import app

    r = CliRunner().invoke(app, ["convert", str(synth), str(tmp_path / "out"), *args, "--no-eval"])
    assert r.exit_code != 0 and match in " ".join(r.output.replace("│", " ").split()), r.output
    assert not (tmp_path / "out").exists()


def test_a_corrupt_bitmap_is_one_clear_error(synth, tmp_path):
    # A row whose bitmap keeps more columns than its values hold: the twin refuses it before reading
    # past the row (on a GPU the kernel reads no further than the row's values either).
    from safetensors.torch import load_file, save_file

    from offbatch.cli.main import app
    from offbatch.engine.reference import ReferenceModel

    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["convert", str(synth), str(out), "--prune", "0.5", "--no-eval", "--quiet"])
    assert r.exit_code == 0, r.output
    files = sorted(out.glob("*.safetensors"))
    for f in files:
        t = load_file(str(f))
        name = next((n for n in sorted(t) if n.endswith("q_proj.weight.bits")), None)
        if name is not None:
            t[name][0, :] = 255
            save_file(t, str(f), metadata={"format": "pt"})
            break
    with pytest.raises(ValueError, match="a row keeps .* values but values holds"):
        ReferenceModel.load(out, dtype="float32").greedy([[3, 5, 7]], 1)


@pytest.mark.parametrize("args, name", [(["--prune", "0.5", "--weights", "int8"], "bitmap-50-int8"),
                                        (["--weights", "int4"], "int4")])
def test_synth_writes_a_folder_in_a_format_as_convert_would(tmp_path, args, name):
    # Generated and encoded tensor by tensor (the dense model is never held): the same stored tensors as
    # converting the dense synth folder, and the same tokens.
    from safetensors.torch import load_file

    from offbatch.cli.main import app
    from offbatch.engine.reference import ReferenceModel

    r = CliRunner().invoke(app, ["synth", "llama", str(tmp_path / "direct"), "--seed", "5", *args, "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["synth", "llama", str(tmp_path / "dense"), "--seed", "5", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "dense"), str(tmp_path / "conv"), "--weights", name,
                                 "--no-eval", "--quiet"])
    assert r.exit_code == 0, r.output
    direct, conv = load_file(str(tmp_path / "direct" / "model.safetensors")), load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert direct.keys() == conv.keys() and all(torch.equal(direct[k], conv[k]) for k in direct)
    cfg = json.loads((tmp_path / "direct" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == name
    a = ReferenceModel.load(tmp_path / "direct", dtype="float32").greedy([[3, 5, 7]], 3)
    assert a == ReferenceModel.load(tmp_path / "conv", dtype="float32").greedy([[3, 5, 7]], 3)


def test_a_bf16_bitmap_folder_runs_in_float32(tmp_path):
    # The kept values are stored in bfloat16 whatever the folder's dtype, so a folder written from a bf16
    # model opens and runs in another compute dtype (convert's float32 quality report did not).
    from offbatch.cli.main import app
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    src, out = tmp_path / "src", tmp_path / "b"
    assert CliRunner().invoke(app, ["synth", "llama", str(src), "--dtype", "bfloat16", "--quiet"]).exit_code == 0
    r = CliRunner().invoke(app, ["convert", str(src), str(out), "--prune", "0.5", "--no-eval", "--quiet"])
    assert r.exit_code == 0, r.output
    want = ReferenceModel.load(out, dtype="float32").greedy([[3, 5, 7], [9, 2]], 3)
    eng = engine_for_folder(out, device="cpu", dtype="float32", num_requests=2, max_len=16, max_resident_bytes=0)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=3, ignore_eos=True)) for i, p in enumerate([[3, 5, 7], [9, 2]])]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[0], outs[1]] == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["bitmap-50", "bitmap-50-int8", "bitmap-70-int4"])
def test_the_gpu_linear_expands_what_the_twin_does(name):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1024, 4096, generator=g) * 0.05
    fmt = get_format(name)
    stored = fmt.encode("up.weight", w, torch.bfloat16)
    twin = fmt.dequantize(stored, "up.weight", torch.bfloat16, 4096)
    on_gpu = {n: t.cuda() for n, t in stored.items()}
    x = torch.randn(64, 4096, generator=g).to(torch.bfloat16)
    got = fmt.linear(x.cuda(), on_gpu, "up").cpu()
    assert torch.equal(fmt.dequantize(on_gpu, "up.weight", torch.bfloat16, 4096).cpu(), twin)
    assert torch.allclose(got.float(), F.linear(x.float(), twin.float()), rtol=2e-2, atol=2e-2)
