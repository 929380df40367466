"""Row gathering (offbatch/kernels/rows_triton.py) against its torch twin (rows_reference.py): a copy, so
bit-exact, for ragged sizes, both index dtypes, an `out` larger than needed, and, on a GPU, a pinned host
source read in place by the kernel (the hybrid FFN's cold neurons)."""

import pytest
import torch
from triton_support import triton_kernel_module

import offbatch.kernels as kernels
from offbatch.kernels import rows_reference as ref

CUDA = torch.cuda.is_available()
rt = triton_kernel_module("rows_triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,C,n", [(1, 1, 1), (7, 33, 5), (50, 300, 17), (64, 2100, 64), (9, 4096, 0)])
def test_triton_gather_equals_twin(dtype, N, C, n):
    g = torch.Generator().manual_seed(N * 1000 + C + n)
    src = torch.randn(N, C, generator=g).to(dtype)
    for idx_dtype in (torch.int64, torch.int32):
        idx = torch.randint(0, N, (n,), generator=g).to(idx_dtype)
        want = ref.gather_rows(src, idx)
        got = rt.gather_rows(src, idx)
        assert got.shape == (n, C)
        assert torch.equal(got, want)
        assert torch.equal(want, src[idx.long()])
        out = torch.full((n + 3, C), 7.0, dtype=dtype)
        got = rt.gather_rows(src, idx, out=out)
        assert (n == 0 or got.data_ptr() == out.data_ptr()) and torch.equal(out[:n], want)
        assert (out[n:] == 7).all()  # rows past n untouched


def test_gather_strided_source_rows():
    """A view whose rows are strided (a slice of columns of a wider matrix keeps stride 1 along C)."""
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(20, 64, generator=g)
    src = wide[:, 8:40]
    idx = torch.tensor([19, 0, 3, 3])
    assert torch.equal(rt.gather_rows(src, idx), src[idx])


def test_bad_arguments_are_clear_errors():
    src = torch.randn(4, 8)
    with pytest.raises(ValueError, match="2-D"):
        ref.gather_rows(src[0], torch.tensor([0]))
    with pytest.raises(ValueError, match="int32/int64"):
        ref.gather_rows(src, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="out must be"):
        ref.gather_rows(src, torch.tensor([0, 1]), out=torch.empty(1, 8))
    with pytest.raises(ValueError, match="contiguous rows"):
        ref.gather_rows(src.t(), torch.tensor([0]))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,C,n", [(28672, 7168, 1827), (1000, 4096, 1), (333, 1000, 333)])
def test_gpu_gathers_pinned_host_rows_in_place(dtype, N, C, n):
    g = torch.Generator().manual_seed(N + n)
    src = torch.randn(N, C, generator=g).to(dtype).pin_memory()
    idx = torch.randperm(N, generator=g)[:n].sort().values.cuda()
    out = torch.empty(n + 5, C, dtype=dtype, device="cuda")
    got = kernels.gather_rows(src, idx, out=out)
    assert got.is_cuda and torch.equal(got.cpu(), src[idx.cpu()])
    assert torch.equal(kernels.gather_rows(src.cuda(), idx), got)  # a device source too


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_refuses_an_unpinned_host_source():
    src = torch.randn(8, 64)
    with pytest.raises(ValueError, match="pinned"):
        kernels.gather_rows(src, torch.tensor([1, 2], device="cuda"))


# ---- scatter_tokens: a step's new K/V rows into a [slots, heads, positions, row] layout -------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.uint8])
@pytest.mark.parametrize("S,H,P,C,n", [(1, 1, 1, 1, 1), (5, 3, 7, 33, 4), (16, 8, 40, 132, 16), (9, 2, 5, 1500, 0)])
def test_triton_scatter_equals_twin(dtype, S, H, P, C, n):
    g = torch.Generator().manual_seed(S * 100 + C + n)
    # distinct (slot, position) pairs, in a random order
    pairs = torch.randperm(S * P, generator=g)[:n]
    slots, pos = pairs // P, pairs % P
    if dtype == torch.uint8:
        src = torch.randint(0, 256, (n, H, C), generator=g, dtype=torch.uint8)
    else:
        src = torch.randn(n, H, C, generator=g).to(dtype)
    for idx_dtype in (torch.int64, torch.int32):
        want = ref.scatter_tokens(src, slots.to(idx_dtype), pos.to(idx_dtype), torch.zeros(S, H, P, C, dtype=dtype))
        got = rt.scatter_tokens(src, slots.to(idx_dtype), pos.to(idx_dtype), torch.zeros(S, H, P, C, dtype=dtype))
        assert torch.equal(got, want)
        for j in range(n):
            assert torch.equal(want[slots[j], :, pos[j]], src[j])
        assert int((want != 0).any(dim=-1).sum()) <= n * H  # nothing written outside the rows


def test_scatter_strided_source_and_layer_view():
    """Rows taken from a wider projection output (strided heads) into one layer's view of a larger store."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 3, 20, generator=g)
    src = wide[:, :, 4:12]  # [4, 3, 8], C contiguous, rows strided
    store = torch.zeros(2, 6, 3, 10, 8)  # layers, slots, heads, positions, row
    slots, pos = torch.tensor([5, 0, 2, 3]), torch.tensor([9, 0, 4, 4])
    rt.scatter_tokens(src, slots, pos, store[1])
    assert torch.equal(store[1][slots, :, pos], src) and not store[0].any()


def test_scatter_bad_arguments_are_clear_errors():
    dst = torch.zeros(3, 2, 4, 8)
    src = torch.zeros(2, 2, 8)
    i = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dst must be"):
        ref.scatter_tokens(src, i, i, dst[0])
    with pytest.raises(ValueError, match="src must be"):
        ref.scatter_tokens(torch.zeros(2, 3, 8), i, i, dst)
    with pytest.raises(ValueError, match="src must be"):
        ref.scatter_tokens(src.half(), i, i, dst)
    with pytest.raises(ValueError, match="slots must be"):
        ref.scatter_tokens(src, torch.tensor([0]), i, dst)
    with pytest.raises(ValueError, match="pos must be"):
        ref.scatter_tokens(src, i, i.float(), dst)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_gpu_scatters_into_pinned_host_rows_in_place(dtype):
    g = torch.Generator().manual_seed(11)
    S, H, P, C, n = 1024, 8, 96, 132 if dtype == torch.uint8 else 128, 908
    dst = torch.zeros(S, H, P, C, dtype=dtype).pin_memory()
    pairs = torch.randperm(S * P, generator=g)[:n]
    slots, pos = (pairs // P).cuda(), (pairs % P).cuda()
    src = (torch.randint(0, 256, (n, H, C), generator=g, dtype=torch.uint8) if dtype == torch.uint8
           else torch.randn(n, H, C, generator=g).to(dtype)).cuda()
    got = kernels.scatter_tokens(src, slots, pos, dst)
    torch.cuda.synchronize()
    assert got.data_ptr() == dst.data_ptr()
    want = ref.scatter_tokens(src.cpu(), slots.cpu(), pos.cpu(), torch.zeros(S, H, P, C, dtype=dtype))
    assert torch.equal(dst, want)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_scatter_refuses_an_unpinned_host_destination():
    with pytest.raises(ValueError, match="pinned"):
        kernels.scatter_tokens(torch.zeros(1, 1, 4, device="cuda"), torch.tensor([0], device="cuda"),
                               torch.tensor([0], device="cuda"), torch.zeros(1, 1, 1, 4))
