"""The int8 and int4 weight formats: their packing against a reference computed here independently (numpy,
element by element: the integers exact, the scales within float16 rounding of the exact figure), ragged
widths padded to a whole group, the bytes they take against bf16, and the streaming engine over each
format giving the reference forward's greedy tokens over the same quantized weights."""

import numpy as np
import pytest
import torch

from hf_factory import save_hf_model
from offbatch.formats import INT4, INT4_ASYM, INT8, Int4Format, get_format
from offbatch.models.loader import open_checkpoint
from offbatch.offload.disk import read_module_now
from offbatch.offload.weights import CheckpointSource, WeightStore
from offbatch.planner.shape import shape_from_spec

PROMPTS = [[3, 5, 7, 9, 11, 13, 2], [4, 8, 15, 16, 23, 42, 1, 2, 3], [99], [7, 7, 7]]
NEW = 6
INT4_KINDS = [Int4Format(g, asym) for g in (32, 64, 128) for asym in (False, True)]


def weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, : min(k, 40)] = 0.0  # an all-zero group (and a zero row start)
    w[1] *= 100.0  # a row of a much larger magnitude
    return w


def nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """Input i of each row: byte i // 2, low nibble for even i, high for odd."""
    i = np.arange(k)
    return (packed[:, i // 2] >> (4 * (i % 2))) & 15


def int4_reference(w: np.ndarray, group: int, asym: bool):
    """Per row and group, from the group's own inputs only (no padding): (q [N, K], scale, min [N, G])."""
    n, k = w.shape
    g = -(-k // group)
    q = np.zeros((n, k), np.int64)
    scale, low = np.zeros((n, g), np.float16), np.zeros((n, g), np.float16)
    for r in range(n):
        for j in range(g):
            vals = w[r, j * group : (j + 1) * group]
            if asym:
                scale[r, j] = np.float16((vals.max() - vals.min()) / np.float32(15))
                low[r, j] = np.float16(vals.min())
                s = np.float32(scale[r, j]) or np.float32(1)
                q[r, j * group : j * group + len(vals)] = np.clip(np.rint((vals - np.float32(low[r, j])) / s), 0, 15)
            else:
                scale[r, j] = np.float16(np.abs(vals).max() / np.float32(7))
                s = np.float32(scale[r, j]) or np.float32(1)
                q[r, j * group : j * group + len(vals)] = np.clip(np.rint(vals / s), -8, 7) + 8
    return q, scale, low


def test_int8_round_trip_against_a_reference():
    w = weight(6, 100)
    enc = INT8.encode("q.weight", w, torch.bfloat16)
    assert enc["q.weight.q8"].dtype == torch.int8 and enc["q.weight.scale"].shape == (6, 1)
    a = w.numpy()
    scale = np.abs(a).max(axis=1, keepdims=True) / np.float32(127)
    q = np.clip(np.rint(a / np.where(scale > 0, scale, 1)), -127, 127)
    assert np.array_equal(enc["q.weight.q8"].numpy(), q)
    assert np.allclose(enc["q.weight.scale"].numpy(), np.abs(a.astype(np.float64)).max(1, keepdims=True) / 127, rtol=1e-6)
    back = INT8.dequantize(enc, "q.weight", torch.float32)
    assert torch.equal(back, torch.from_numpy((q * enc["q.weight.scale"].numpy()).astype(np.float32)))
    assert ((back - w).abs() <= enc["q.weight.scale"] / 2 * (1 + 1e-5)).all()
    assert torch.equal(INT8.dequantize(enc, "q.weight", torch.bfloat16), back.to(torch.bfloat16))


@pytest.mark.parametrize("k", [64, 128, 100, 33, 200], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("fmt", INT4_KINDS, ids=lambda f: f.name)
def test_int4_round_trip_against_a_reference(fmt, k):
    w = weight(5, k, seed=k)
    enc = fmt.encode("experts.2.up.weight", w, torch.bfloat16)
    g = -(-k // fmt.group)  # a ragged width is padded to a whole group
    assert [(n, tuple(enc[n].shape), enc[n].dtype) for n, _, _ in fmt.stored("experts.2.up.weight", (5, k), torch.bfloat16)] \
        == [(n, s, d) for n, s, d in fmt.stored("experts.2.up.weight", (5, k), torch.bfloat16)]
    assert enc["experts.2.up.weight.q4"].shape == (5, g * fmt.group // 2)
    q, scale, low = int4_reference(w.numpy(), fmt.group, fmt.asymmetric)
    assert np.array_equal(nibbles(enc["experts.2.up.weight.q4"].numpy(), k), q)  # the integers: exact
    assert np.array_equal(enc["experts.2.up.weight.scale"].numpy(), scale)
    # ... and the scales within float16 rounding of the exact figure.
    a = w.numpy().astype(np.float64)
    pad = np.pad(a, ((0, 0), (0, g * fmt.group - k)), mode="edge").reshape(5, g, fmt.group)
    exact = (pad.max(-1) - pad.min(-1)) / 15 if fmt.asymmetric else np.abs(pad).max(-1) / 7
    assert np.allclose(scale.astype(np.float64), exact, rtol=2**-11, atol=2**-24)
    s = scale.astype(np.float32).repeat(fmt.group, axis=1)[:, :k]
    if fmt.asymmetric:
        assert np.array_equal(enc["experts.2.up.weight.min"].numpy(), low)
        ref = q * s + low.astype(np.float32).repeat(fmt.group, axis=1)[:, :k]
    else:
        ref = (q - 8) * s
    back = fmt.dequantize(enc, "experts.2.up.weight", torch.float32, k)
    assert back.shape == (5, k) and torch.allclose(back, torch.from_numpy(ref.astype(np.float32)), rtol=1e-6, atol=0)
    assert ((back - w).abs() <= torch.from_numpy(s) * (0.5 + 1e-3) + 1e-3 * w.abs()).all()  # half a step at most
    assert fmt.dequantize(enc, "experts.2.up.weight", torch.float32).shape == (5, g * fmt.group)  # pads kept
    x = torch.randn(3, k)
    assert torch.equal(fmt.weights(enc).linear(x, "experts.2.up"), torch.nn.functional.linear(x, back))


def test_what_is_quantized():
    for fmt in (INT8, INT4, INT4_ASYM):
        for local, shape in [("q.weight", (8, 64)), ("experts.3.down.weight", (64, 32)), ("shared.gate.weight", (8, 64))]:
            assert fmt.compresses(local, shape) and not fmt.unchanged(local, shape, torch.bfloat16)
        for local, shape in [("router.weight", (8, 64)), ("shared_gate.weight", (1, 64)), ("attn_norm.weight", (64,)),
                             ("q.bias", (8,)), ("embed", (128, 64)), ("lm_head", (128, 64)), ("project_out", (32, 64))]:
            assert not fmt.compresses(local, shape) and fmt.unchanged(local, shape, torch.bfloat16)
    assert {get_format(n) for n in ("int8", "int4", "int4-asym")} == {INT8, INT4, INT4_ASYM}
    assert INT4.group == 64 and not INT4.asymmetric and Int4Format(128).name == "int4-g128"
    with pytest.raises(ValueError, match="even"):
        Int4Format(33)


@pytest.mark.parametrize("fmt,lo,hi", [(INT8, 1 / 2, 1 / 1.98), (INT4, 1 / 4, 1 / 3.5), (INT4_ASYM, 1 / 4, 1 / 3.5),
                                       (Int4Format(128), 1 / 4, 1 / 3.5), (Int4Format(128, True), 1 / 4, 1 / 3.5),
                                       (Int4Format(32), 1 / 4, 1 / 3.5)], ids=lambda v: getattr(v, "name", ""))
def test_bytes_per_weight_against_bf16(fmt, lo, hi):
    parts = [("q.weight", (4096, 4096)), ("k.weight", (1024, 4096)), ("o.weight", (4096, 4096))]
    dense = sum(n * k * 2 for _, (n, k) in parts)
    ratio = fmt.layout(parts, torch.bfloat16).nbytes / dense  # scales (and alignment) included
    assert lo <= ratio <= hi, ratio


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, path)
    return path


@pytest.mark.parametrize("name", ["int8", "int4", "int4-asym"])
def test_the_store_packs_a_format_as_the_planner_sizes_it_from_host_and_disk(model, name):
    fmt = get_format(name)
    ckpt = open_checkpoint(model)
    store = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=fmt)
    dense = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False)
    assert shape_from_spec(ckpt.spec, torch.float32, fmt).nbytes == {k: store.nbytes(k) for k in store.keys()}
    layers = [k for k in store.keys() if k[0] >= 0 and k[1] != "router"]
    assert all(store.nbytes(k) < dense.nbytes(k) for k in layers)
    on_disk = WeightStore(CheckpointSource(ckpt), torch.float32, pin=False, fmt=fmt, disk=set(layers))
    for key in layers:
        from_disk = on_disk.layouts[key].views(read_module_now(on_disk, key))
        for n, t in store.layouts[key].views(store.host[key]).items():
            assert torch.equal(from_disk[n], t), (key, n)


@pytest.mark.parametrize("name", ["int4", "int8", "int4-asym"])
def test_the_streaming_engine_runs_a_format_with_the_reference_tokens(model, name):
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.reference import ReferenceModel

    ref = ReferenceModel.load(model, dtype="float32", weights=name)
    assert any(k.endswith(".q4") or k.endswith(".q8") for k in ref.modules[(0, "attn")])
    expected = ref.greedy(PROMPTS, NEW)
    eng = engine_for_folder(model, device="cpu", dtype="float32", num_requests=len(PROMPTS), max_len=32,
                            max_resident_bytes=0, weights=name)
    assert eng.store.format is get_format(name) and eng.plan.weights == name
    if any(eng.spec.moe_layers):
        assert eng.experts is not None  # the grouped kernels take the format's experts (twins on the CPU)
    reqs = [GenRequest(i, p, SamplingParams(max_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    outs = {o.key: o.token_ids for o in eng.generate(reqs)}
    assert [outs[i] for i in range(len(PROMPTS))] == expected


def test_greedy_agreement_with_dense_is_measured(tmp_path, capsys):
    """Not a quality claim (random weights): that every format runs end to end; the figures are printed:
    free-running greedy tokens equal to dense's, and the top-1 agreement at every position of the dense
    continuation (teacher-forced: one early divergence does not count twice)."""
    from offbatch.engine.reference import ReferenceModel
    from offbatch.tools.synth import synth_model

    synth_model("llama", tmp_path, seed=3)
    prompts = [[(7 * i + 3 * j) % 97 + 1 for j in range(12)] for i in range(8)]
    dense = ReferenceModel.load(tmp_path, dtype="float32")
    greedy = dense.greedy(prompts, 16)
    seqs = [p + g for p, g in zip(prompts, greedy)]

    def top1(m):
        return m.forward([m.new_cache(len(s)) for s in seqs], seqs, all_logits=True).argmax(-1)

    base, lines = top1(dense), []
    for name in ("int8", "int4", "int4-asym"):
        m = ReferenceModel.load(tmp_path, dtype="float32", weights=name)
        same = sum(a == b for d, g in zip(greedy, m.greedy(prompts, 16)) for a, b in zip(d, g))
        lines.append(f"{name:>9}: greedy tokens equal to dense {same}/{16 * len(prompts)}, "
                     f"top-1 agreement {(top1(m) == base).float().mean().item():.3f} over {base.numel()} positions")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
