"""The bitsandbytes 4-bit formats (nf4, fp4): their stored tensors against bitsandbytes' own quantization
and an independent reference (block maxima, nearest code value), the QuantState rebuilt from the stored
bytes dequantizing exactly as bitsandbytes' own, the plain-torch twin, linear, row slicing, what stays
dense, refusals, the error without bitsandbytes, and the streaming engine over each format giving the
reference forward's greedy tokens over the same quantized weights."""

import builtins
import subprocess
import sys

import bitsandbytes
import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import offbatch.formats.bnb4  # noqa: F401  (registers nf4 and fp4)
from hf_factory import save_hf_model
from offbatch.errors import OffbatchError
from offbatch.formats import get_format
from offbatch.formats.bnb4 import FP4, NF4, Bnb4Format, code_book
from offbatch.models.loader import open_checkpoint
from offbatch.offload.disk import read_module_now
from offbatch.offload.weights import CheckpointSource, WeightStore
from offbatch.planner.shape import shape_from_spec

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99], [7, 7, 7]]
NEW = 6
KINDS = [NF4, FP4, Bnb4Format("nf4", 32), Bnb4Format("fp4", 128)]
LOCAL = "experts.2.up.weight"


def weight(n, k, seed=0, zeros=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :zeros] = 0.0  # an all-zero block
    w[1] *= 100.0  # a row of a much larger magnitude
    w[2, 5] = 3.0  # an outlier: its block's scale
    return w


def own_quantization(fmt, w):
    """bitsandbytes' own bytes and QuantState for w (float32)."""
    return bnbf.quantize_4bit(w.float(), blocksize=fmt.blocksize, compress_statistics=False, quant_type=fmt.quant_type)


def indices(packed: np.ndarray, k: int) -> np.ndarray:
    """Input i of each row: byte i // 2, high nibble for even i, low for odd (bitsandbytes' order)."""
    i = np.arange(k)
    return (packed[:, i // 2] >> (4 * (1 - i % 2))) & 15


def test_code_books_are_bitsandbytes_own():
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_book(qt), bnbf.get_4bit_type(qt, device="cpu"))
        assert code_book(qt) is code_book(qt, torch.device("cpu"))  # built once


@pytest.mark.parametrize("k", [64, 128, 256], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("fmt", KINDS, ids=lambda f: f.name)
def test_round_trip_against_bitsandbytes_and_a_reference(fmt, k):
    if k % fmt.blocksize:
        pytest.skip("kept dense (tested below)")
    n, bs = 5, fmt.blocksize
    w = weight(n, k, seed=k, zeros=bs)
    enc = fmt.encode(LOCAL, w, torch.bfloat16)
    stored = fmt.stored(LOCAL, (n, k), torch.bfloat16)
    assert [(name, tuple(enc[name].shape), enc[name].dtype) for name, _, _ in stored] == stored
    assert [s[1:] for s in stored] == [((n, k // 2), torch.uint8), ((n, k // bs), torch.float32)]
    packed, absmax = enc[f"{LOCAL}.{fmt.quant_type}"], enc[f"{LOCAL}.absmax"]

    # bitsandbytes' own bytes and statistics, reshaped.
    own, state = own_quantization(fmt, w)
    assert torch.equal(packed.reshape(-1), own.reshape(-1)) and torch.equal(absmax.reshape(-1), state.absmax)

    # Independently: each block's maximum magnitude, and each value's index the nearest code value.
    a = w.numpy().reshape(n, k // bs, bs)
    assert np.array_equal(absmax.numpy(), np.abs(a).max(-1))
    code = code_book(fmt.quant_type).numpy()
    q = indices(packed.numpy(), k).reshape(n, k // bs, bs)
    scaled = a / np.where(absmax.numpy() > 0, absmax.numpy(), 1)[..., None]
    nearest = np.abs(scaled[..., None] - code).min(-1)
    assert (np.abs(scaled - code[q]) <= nearest + 1e-6).all()
    # ... so the error of a value is half the widest gap of the code book at most, of its block's maximum.
    half_gap = np.diff(np.sort(code)).max() / 2
    back = fmt.dequantize(enc, LOCAL, torch.float32)
    err = (back - w).abs().view(n, k // bs, bs)
    assert (err <= absmax[..., None] * (half_gap + 1e-6)).all()
    assert np.array_equal(back.numpy(), (code[q] * absmax.numpy()[..., None]).reshape(n, k))
    assert (back.view(n, -1, bs)[0, 0] == 0).all()  # an all-zero block stays zero

    # The dequantization equals bitsandbytes' own, of its own QuantState, bit for bit, rounded once.
    own_back = bnbf.dequantize_4bit(own, state)
    assert torch.equal(back, own_back)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(fmt.dequantize(enc, LOCAL, dtype), own_back.to(dtype))
    # ... and the plain-torch twin equals both.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(fmt.dequantize_torch(enc, LOCAL, dtype), fmt.dequantize(enc, LOCAL, dtype))


@pytest.mark.parametrize("fmt", [NF4, FP4], ids=lambda f: f.name)
def test_the_rebuilt_quant_state_is_bitsandbytes_own(fmt):
    w = weight(7, 192, seed=3)
    own, state = own_quantization(fmt, w)
    enc = fmt.encode("q.weight", w, torch.float32)
    rebuilt = fmt.quant_state(enc, "q.weight", torch.float32)
    assert rebuilt == state and not rebuilt.nested
    assert (rebuilt.shape, rebuilt.blocksize, rebuilt.quant_type, rebuilt.dtype) == \
        (state.shape, state.blocksize, state.quant_type, state.dtype)
    assert torch.equal(rebuilt.code, state.code) and torch.equal(rebuilt.absmax, state.absmax)
    assert torch.equal(bnbf.dequantize_4bit(own, rebuilt), bnbf.dequantize_4bit(own, state))


@pytest.mark.parametrize("fmt", [NF4, FP4], ids=lambda f: f.name)
def test_a_module_packs_and_its_views_compute_the_same(fmt):
    parts = [("q.weight", (32, 64)), ("q.bias", (32,)), ("o.weight", (1, 128)), ("down.weight", (64, 96)),
             ("attn_norm.weight", (64,))]
    layout = fmt.layout(parts, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    logical = {local: torch.randn(*shape, generator=g) * 0.1 for local, shape in parts}
    enc = {name: t for local, w in logical.items() for name, t in fmt.encode(local, w, torch.bfloat16).items()}
    assert sorted(enc) == sorted(it.name for it in layout.items)
    flat = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(flat)
    for name, t in enc.items():
        views[name].copy_(t)
    again = layout.views(flat)
    assert all(torch.equal(again[name], t) and again[name].dtype == t.dtype for name, t in enc.items())
    assert "down.weight" in enc and enc["down.weight"].dtype == torch.bfloat16  # K = 96: dense
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    mw = fmt.weights(again)
    assert torch.equal(mw.linear(x, "q"), F.linear(x, fmt.dequantize(enc, "q.weight", torch.bfloat16), enc["q.bias"]))
    one_row = mw.linear(torch.randn(2, 128, generator=g).to(torch.bfloat16), "o")  # N = 1: no transposed output
    assert one_row.shape == (2, 1)
    assert fmt.dequantize(again, "o.weight", torch.float32).shape == (1, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", KINDS, ids=lambda f: f.name)
def test_linear_is_the_twin(fmt, dtype):
    n, k = 48, 256
    w = weight(n, k, seed=5)
    enc = fmt.encode("gate.weight", w, dtype)
    enc["gate.bias"] = (torch.randn(n) * 0.1).to(dtype)
    for rows in (1, 5, 33):
        x = torch.randn(rows, k).to(dtype)
        want = F.linear(x, fmt.dequantize_torch(enc, "gate.weight", dtype), enc["gate.bias"])
        got = fmt.linear(x, enc, "gate")
        assert got.dtype == dtype and torch.equal(got, want)
        packed, state = enc["gate.weight." + fmt.quant_type], fmt.quant_state(enc, "gate.weight", dtype)
        assert torch.equal(got, bitsandbytes.matmul_4bit(x, packed.reshape(-1, 1), state, bias=enc["gate.bias"]))


@pytest.mark.parametrize("fmt", KINDS, ids=lambda f: f.name)
def test_a_row_slice_encodes_to_a_row_slice(fmt):
    w = weight(11, 256, seed=7)
    whole = fmt.encode("up.weight", w, torch.bfloat16)
    for lo, hi in ((0, 4), (3, 10), (10, 11)):
        part = fmt.encode("up.weight", w[lo:hi], torch.bfloat16)
        assert part.keys() == whole.keys()
        assert all(torch.equal(part[name], whole[name][lo:hi]) for name in whole)


def test_what_is_quantized_and_the_names():
    for fmt in (NF4, FP4):
        for local, shape in [("q.weight", (8, 64)), ("experts.3.down.weight", (64, 128)),
                             ("shared.gate.weight", (8, 64))]:
            assert fmt.compresses(local, shape) and not fmt.unchanged(local, shape, torch.bfloat16)
        for local, shape in [("down.weight", (64, 96)), ("q.weight", (8, 32)), ("router.weight", (8, 64)),
                             ("shared_gate.weight", (1, 64)), ("attn_norm.weight", (64,)), ("q.bias", (8,)),
                             ("embed", (128, 64)), ("lm_head", (128, 64))]:
            assert not fmt.compresses(local, shape) and fmt.unchanged(local, shape, torch.bfloat16)
        w = torch.randn(8, 96)
        dense = fmt.encode("down.weight", w, torch.bfloat16)
        assert list(dense) == ["down.weight"] and torch.equal(dense["down.weight"], w.to(torch.bfloat16))
        assert fmt.grouped_experts is False
    assert Bnb4Format("nf4", 32).compresses("q.weight", (8, 96))  # K = 96 is three blocks of 32
    assert (get_format("nf4"), get_format("fp4")) == (NF4, FP4)
    assert (NF4.quant_type, NF4.blocksize, FP4.quant_type) == ("nf4", 64, "fp4")
    assert Bnb4Format("fp4", 128).name == "fp4-g128"
    for name, (qt, bs) in {"nf4-g128": ("nf4", 128), "fp4-g32": ("fp4", 32), "nf4-g4096": ("nf4", 4096)}.items():
        fmt = get_format(name)
        assert (fmt.name, fmt.quant_type, fmt.blocksize) == (name, qt, bs) and get_format(name) is fmt
    for name in ("nf4-g64", "nf4-g48", "nf4-g8192", "nf4-b128", "nf5", "nf4-asym"):
        with pytest.raises(KeyError):
            get_format(name)
    with pytest.raises(ValueError, match="blocks of"):
        Bnb4Format("nf4", 48)
    with pytest.raises(ValueError, match="nf4 or fp4"):
        Bnb4Format("int4")


@pytest.mark.parametrize("fmt", [NF4, Bnb4Format("nf4", 128)], ids=lambda f: f.name)
def test_bytes_per_weight_against_bf16(fmt):
    parts = [("q.weight", (4096, 4096)), ("k.weight", (1024, 4096)), ("o.weight", (4096, 4096))]
    dense = sum(n * k * 2 for _, (n, k) in parts)
    ratio = fmt.layout(parts, torch.bfloat16).nbytes / dense  # absmax (and alignment) included
    assert 1 / 4 <= ratio <= 1 / 3.5, ratio


@pytest.mark.parametrize("fmt", [NF4, FP4], ids=lambda f: f.name)
def test_weights_it_cannot_store_are_refused(fmt):
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = weight(4, 64)
        w[2, 9] = bad
        with pytest.raises(ValueError, match="not finite"):
            fmt.encode("q.weight", w, torch.bfloat16)
    big = weight(4, 64)
    big[3, 1] = 1e5  # beyond float16, fine in bfloat16 and float32
    with pytest.raises(ValueError, match="too large"):
        fmt.encode("q.weight", big, torch.float16)
    for dtype in (torch.bfloat16, torch.float32):
        assert fmt.dequantize(fmt.encode("q.weight", big, dtype), "q.weight", dtype).abs().max() == \
            torch.tensor(1e5).to(dtype)


def test_without_bitsandbytes_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    w = weight(4, 64)
    assert NF4.compresses("q.weight", (4, 64)) and NF4.layout([("q.weight", (4, 64))], torch.bfloat16).nbytes
    for call in (lambda: NF4.encode("q.weight", w, torch.bfloat16),
                 lambda: FP4.dequantize({"q.weight.fp4": torch.zeros(4, 32, dtype=torch.uint8),
                                         "q.weight.absmax": torch.ones(4, 1)}, "q.weight", torch.float32)):
        with pytest.raises(OffbatchError, match=r"pip install bitsandbytes==0\.50\.2"):
            call()
    # The plain-torch twin needs no bitsandbytes.
    enc = {"q.weight.nf4": torch.full((4, 32), 0xF0, dtype=torch.uint8), "q.weight.absmax": torch.full((4, 1), 2.0)}
    assert torch.equal(NF4.dequantize_torch(enc, "q.weight", torch.float32)[0, :2], torch.tensor([2.0, -2.0]))


def test_importing_offbatch_does_not_import_bitsandbytes():
    code = ("import sys, offbatch, offbatch.formats, offbatch.formats.bnb4\n"
            "assert 'bitsandbytes' not in sys.modules, 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    return path


def test_the_store_packs_nf4_as_the_planner_sizes_it_from_host_and_disk(model):
    ckpt = open_checkpoint(model)
    store = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=NF4)
    dense = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False)
    assert shape_from_spec(ckpt.spec, torch.float32, NF4).nbytes == {k: store.nbytes(k) for k in store.keys()}
    layers = [k for k in store.keys() if k[0] >= 0 and k[1] != "router"]
    assert all(store.nbytes(k) < dense.nbytes(k) for k in layers)
    on_disk = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=NF4, disk=set(layers))
    for key in layers:
        from_disk = on_disk.layouts[key].views(read_module_now(on_disk, key))
        for n, t in store.layouts[key].views(store.host[key]).items():
            assert torch.equal(from_disk[n], t), (key, n)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_the_streaming_engine_runs_a_format_with_the_reference_tokens(model, name):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    ref = ReferenceModel.load(model, dtype="float32", weights=name)
    assert any(k.endswith(f".{name}") for k in ref.modules[(0, "attn")])
    expected = ref.greedy(PROMPTS, NEW)
    eng = engine_for_folder(model, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0, weights=name)
    assert eng.store.format is get_format(name) and eng.plan.weights == name
    if any(eng.spec.moe_layers):
        assert eng.experts is None  # no grouped kernels for the format: experts one by one
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [NF4, FP4], ids=lambda f: f.name)
def test_gpu_linear_equals_the_twin(fmt):
    """On the GPU bitsandbytes' matmul_4bit picks its fused 4-bit GEMM for few rows and dequantize + cuBLAS
    for many: both equal the twin up to the GEMM's summation order (bf16 output rounding)."""
    n, k = 512, 1024
    w = weight(n, k, seed=11)
    enc = {name: t.cuda() for name, t in fmt.encode("up.weight", w, torch.bfloat16).items()}
    enc["up.bias"] = (torch.randn(n) * 0.1).to(torch.bfloat16).cuda()
    deq = fmt.dequantize_torch(enc, "up.weight", torch.bfloat16)
    torch.testing.assert_close(fmt.dequantize(enc, "up.weight", torch.bfloat16), deq, rtol=2**-8, atol=0)
    for rows in (1, 4, 7, 64, 2048):
        x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
        got, want = fmt.linear(x, enc, "up"), F.linear(x.float(), deq.float(), enc["up.bias"].float())
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=2**-7 * want.abs().max().item())
