"""Compressed-KV kernels (offbatch/kernels/kv_triton.py) against their torch twins (kv_reference.py).

Without CUDA the Triton kernels run on the CPU through the Triton interpreter (fp32/fp16, tiny ragged
sizes: it is numpy per program); with CUDA the same cases run compiled, and the `gpu`-marked tests add
bf16 and engine-sized shapes. Encoding is compared bit for bit; attention within the rounding of the
compute dtype (the kernel feeds dequantized K / V to its dots in that dtype, the twin stays in float32).
K and V are always views of a larger store, as the engine passes them: a slot range and a length cut.
"""

import pytest
import torch
from triton_support import triton_kernel_module

from offbatch.kernels import kv_reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


kt = triton_kernel_module("kv_triton")

OUT_TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.5e-2}  # ||out - twin|| / ||twin||
LSE_TOL = {F32: 1e-4, F16: 1e-3, BF16: 1e-2}  # |lse - twin| / max(|twin|, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kv_values(*shape, seed: int) -> torch.Tensor:
    """Random K/V-like values in float32: per-channel offsets and magnitudes (as real keys have), an
    outlier channel, and one constant group (scale 0 -> 1) in the first row."""
    g = gen(seed)
    d = shape[-1]
    x = torch.randn(*shape, generator=g) * (0.5 + torch.rand(d, generator=g)) + torch.randn(d, generator=g)
    x[..., d // 3] *= 8.0
    x.view(-1, d)[0, :4] = 0.75
    return x


def rel_err(out, twin) -> float:
    out, twin = out.double().cpu(), twin.double().cpu()
    return ((out - twin).norm() / twin.norm()).item()


def lse_err(lse, twin) -> float:
    lse, twin = lse.double().cpu(), twin.double().cpu()
    return ((lse - twin).abs() / twin.abs().clamp(min=1.0)).max().item()


# --------------------------------------------------------------------------------------------- encode

# (head_dim, bits, group): the formats' groups (int8 64, int4 32), groups that are no power of two
# (head_dim 80: 40 / 20 / 16), and rows of an odd byte count (head_dim 18, int4: 9 code bytes).
ENCODE = [(64, 8, 64), (128, 4, 32), (128, 8, 64), (80, 4, 20), (80, 8, 16), (80, 8, 40), (18, 4, 6)]


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("d,bits,group", ENCODE)
def test_encode_is_bit_exact(d, bits, group, dtype):
    T, nh, nkv = 7, 3, 2  # a ragged row count
    # The engine encodes k / v slices of a fused QKV output: [T, nkv, d] with a token stride of
    # (nh + 2 nkv) * d, read in place.
    qkv = kv_values(T, (nh + 2 * nkv) * d, seed=d + bits).to(DEVICE, dtype)
    k = qkv[:, nh * d:(nh + nkv) * d].view(T, nkv, d)
    assert not k.is_contiguous()
    packed = kt.kv_encode(k, bits, group)
    assert packed.shape == (T, nkv, ref.row_bytes(d, bits, group)) and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), ref.kv_encode(k.cpu(), bits, group))


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_encode_odd_layouts_and_values(bits, group):
    """Strided head dimension, leading dims that cannot merge (copied), a single row, and values that
    stress the rounding: codes exactly halfway, huge and tiny ranges, a group of one repeated value."""
    d = 64
    x = kv_values(2, 3, 5, 2 * d, seed=bits)
    # A group whose scale is 1/8 exactly and whose values lie halfway between codes: an approximate
    # division would round some of them down instead of up.
    qmax, scale = (1 << bits) - 1, 0.125
    halfway = (torch.arange(group, dtype=F32) % qmax + 0.5) * scale
    halfway[0], halfway[1] = 0.0, qmax * scale
    x[0, 0, 0, : 2 * group : 2] = halfway - 1.0
    x[0, 0, 1, :] *= 3e3
    x[0, 1, 2, :] *= 1e-4
    x[1, 2, 4, :] = -2.5
    for dtype in (F32, F16):
        xs = x.to(DEVICE, dtype)[:, :, :, ::2].transpose(1, 2)  # strides in every dim
        for view in (xs, xs[1, 3, 2]):
            assert torch.equal(kt.kv_encode(view, bits, group).cpu(), ref.kv_encode(view.cpu(), bits, group))


def test_encode_many_rows():
    """More rows than one program takes, the last block ragged."""
    x = kv_values(301, 64, seed=11).to(DEVICE, F16)
    for bits, group in ((8, 64), (4, 32)):
        assert torch.equal(kt.kv_encode(x, bits, group).cpu(), ref.kv_encode(x.cpu(), bits, group))


# ------------------------------------------------------------------------------------------- attention

def kv_store(bits, group, slots, nkv, max_len, d, dtype, seed):
    """K and V stores [slots, nkv, max_len, row] in the compute dtype (bits 16) or packed rows."""
    out = []
    for i in range(2):
        x = kv_values(slots, nkv, max_len, d, seed=seed + i)
        out.append(x.to(DEVICE, dtype) if bits == 16 else ref.kv_encode(x, bits, group).to(DEVICE))
    return out


def slot_lengths(S, L, seed, window):
    """k_len per slot in 1..L, the first 1 and the last L; window_start (optional) below k_len: 0 in the
    first slot, mid-context in the last (not on a tile boundary), random between."""
    g = gen(seed)
    k_len = torch.randint(1, L + 1, (S,), generator=g)
    k_len[0], k_len[-1] = 1, L
    starts = None
    if window:
        starts = (torch.rand(S, generator=g) * k_len).long().clamp(max=k_len - 1)
        starts[-1] = (2 * L) // 5
    return k_len.to(DEVICE), None if starts is None else starts.to(DEVICE)


def check_attention(bits, group, d, S, nkv, rep, L, dtype, seed, window=False, splits=None, use_dot=None):
    """Triton vs twin on views store[a:a+S, :, :L] of stores with more slots and a longer max_len."""
    k_store, v_store = kv_store(bits, group, S + 3, nkv, L + 9, d, dtype, seed)
    a = 2
    k, v = k_store[a:a + S, :, :L], v_store[a:a + S, :, :L]
    q = (torch.randn(S, nkv * rep, d, generator=gen(seed + 7)) * 1.5).to(DEVICE, dtype)
    k_len, starts = slot_lengths(S, L, seed, window)
    out, lse = kt.kv_decode_attention(q, k, v, k_len, bits, group, starts, splits=splits, use_dot=use_dot)
    twin_out, twin_lse = ref.kv_decode_attention(q, k, v, k_len, bits, group, starts)
    assert out.shape == (S, nkv * rep, d) and out.dtype == dtype
    assert lse.shape == (S, nkv * rep) and lse.dtype == F32
    assert rel_err(out, twin_out) <= OUT_TOL[dtype]
    assert lse_err(lse, twin_lse) <= LSE_TOL[dtype]


# (bits, group, head_dim, S, nkv, rep, L, window, splits, use_dot): every bits with rep 1 / 3 / 4 and
# nkv 1 / 2, lengths 1, 7, 50, 130 (tiles of 16 under the interpreter), several splits with empty
# ones (slot 0 has one key), both product paths, head_dim 80's padded groups.
ATTENTION = {
    "dense_L50_rep4": (16, 0, 64, 3, 2, 4, 50, False, None, None),
    "dense_L7_rep1_window": (16, 0, 64, 2, 2, 1, 7, True, None, None),
    "dense_L130_rep3_split4": (16, 0, 64, 2, 1, 3, 130, True, 4, None),
    "int8_L50_rep3_window": (8, 64, 64, 3, 2, 3, 50, True, None, None),
    "int8_L1_rep4": (8, 64, 64, 2, 2, 4, 1, False, None, None),
    "int8_L130_rep1_split3": (8, 64, 64, 2, 1, 1, 130, False, 3, None),
    "int8_d80_g40_L7_rep3": (8, 40, 80, 2, 2, 3, 7, False, None, None),
    "int4_L130_rep4_window_split5": (4, 32, 64, 2, 1, 4, 130, True, 5, None),
    "int4_L7_rep1": (4, 32, 64, 3, 2, 1, 7, False, None, None),
    "int4_d80_g20_L50_rep3": (4, 20, 80, 2, 1, 3, 50, True, None, None),
    "int4_L50_rep4_broadcast": (4, 32, 64, 2, 2, 4, 50, False, 2, False),
    "int8_L50_rep1_dot": (8, 64, 64, 2, 1, 1, 50, True, None, True),
}


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_decode_attention_matches_twin(case, dtype):
    bits, group, d, S, nkv, rep, L, window, splits, use_dot = ATTENTION[case]
    check_attention(bits, group, d, S, nkv, rep, L, dtype, seed=len(case), window=window, splits=splits,
                    use_dot=use_dot)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on 0 / 0
def test_decode_attention_odd_rows_and_no_keys():
    """int4 rows of an odd byte count (parameters read byte by byte), and a slot whose window starts at
    k_len: no keys, so NaN out and -inf LSE, like the twin (with one split and with several)."""
    check_attention(4, 6, 18, 2, 1, 4, 33, F32, seed=3, splits=2)
    d, L = 64, 40
    k_store, v_store = kv_store(8, 64, 3, 1, L, d, F32, seed=5)
    q = torch.randn(3, 2, d, generator=gen(6)).to(DEVICE)
    k_len = torch.tensor([L, 5, 17], device=DEVICE)
    starts = torch.tensor([0, 5, 3], device=DEVICE)
    twin_out, twin_lse = ref.kv_decode_attention(q, k_store, v_store, k_len, 8, 64, starts)
    for splits in (1, 3):
        out, lse = kt.kv_decode_attention(q, k_store, v_store, k_len, 8, 64, starts, splits=splits)
        assert torch.isnan(out[1]).all() and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
        assert rel_err(out[[0, 2]], twin_out[[0, 2]]) <= OUT_TOL[F32]
        assert lse_err(lse[[0, 2]], twin_lse[[0, 2]]) <= LSE_TOL[F32]


def test_decode_attention_rejects_bad_rows():
    q = torch.zeros(2, 4, 64, device=DEVICE)
    k = torch.zeros(2, 2, 8, ref.row_bytes(64, 8, 64), dtype=torch.uint8, device=DEVICE)
    k_len = torch.ones(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="packed K/V rows"):
        kt.kv_decode_attention(q, k, k, k_len, 4, 32)
    with pytest.raises(ValueError, match="k_len"):
        kt.kv_decode_attention(q, k, k, k_len[:1], 8, 64)


# --------------------------------------------------------------------------------- GPU, engine shapes

@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32)])
def test_gpu_encode_bf16_is_bit_exact(bits, group):
    T, nh, nkv, d = 4096, 32, 8, 128
    qkv = (kv_values(T, (nh + 2 * nkv) * d, seed=bits) * 3).to("cuda", BF16)
    v = qkv[:, (nh + nkv) * d:].view(T, nkv, d)
    assert torch.equal(kt.kv_encode(v, bits, group), ref.kv_encode(v, bits, group))


# (bits, group, S, nh, nkv, L, window): Llama-3-8B / Mixtral heads at S=64 and L=4096; one long
# context on few slots (many splits); MHA (rep 1).
GPU_ATTENTION = [
    (16, 0, 64, 32, 8, 4096, False), (8, 64, 64, 32, 8, 4096, False), (4, 32, 64, 32, 8, 4096, True),
    (8, 64, 2, 32, 8, 32768, True), (4, 32, 8, 16, 16, 1000, False), (16, 0, 8, 64, 8, 777, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,S,nh,nkv,L,window", GPU_ATTENTION)
def test_gpu_decode_attention_bf16_matches_twin(bits, group, S, nh, nkv, L, window):
    d = 128
    k_store, v_store = kv_store(bits, group, S + 4, nkv, L + 64, d, BF16, seed=bits + S)
    k, v = k_store[3:3 + S, :, :L], v_store[3:3 + S, :, :L]
    q = torch.randn(S, nh, d, generator=gen(S)).to("cuda", BF16)
    k_len, starts = slot_lengths(S, L, seed=L, window=window)
    out, lse = kt.kv_decode_attention(q, k, v, k_len, bits, group, starts)
    twin_out, twin_lse = ref.kv_decode_attention(q, k, v, k_len, bits, group, starts)
    assert rel_err(out, twin_out) <= OUT_TOL[BF16]
    assert lse_err(lse, twin_lse) <= LSE_TOL[BF16]
