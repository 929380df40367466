"""Plain-torch twin of the bitmap-sparse weight expansion (bitmap_triton.py): same signature, same result.

A pruned linear weight W [N, K] is stored as
  bits    uint8 [N, KB], KB = ceil(K / 8): bit j % 8 (least-significant first) of byte bits[r, j // 8] is
          1 where W[r, j] is kept. Padding bits (columns >= K, in the last byte) are 0.
  values  float [N, C] (bf16, fp16 or fp32): row r's kept values in increasing column order, its first
          popcount(bits[r]) entries; the rest of the row is padding and never read. C >= the largest count.
Expansion writes W's first k columns (k <= K) in the compute dtype: the kept value converted, 0 elsewhere.
It is a copy (one rounding when the dtypes differ), so the Triton kernel equals this twin bit for bit.
"""

from __future__ import annotations

import torch

from offbatch.kernels.quant_reference import check_dtype, check_out


def _desc(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_args(bits, values, k, dtype, out) -> None:
    """The contract, checked before anything runs (shared by the Triton kernel). The per-row counts
    against C are checked only for CPU tensors: reading them from a GPU would cost a host sync."""
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 2:
        raise TypeError(f"bits must be a uint8 tensor [N, ceil(K/8)], got {_desc(bits)}")
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 2:
        raise TypeError(f"values must be a float tensor [N, C], got {_desc(values)}")
    if values.shape[0] != bits.shape[0]:
        raise ValueError(f"values {tuple(values.shape)} and bits {tuple(bits.shape)} have different rows")
    if values.device != bits.device:
        raise ValueError(f"values are on {values.device} but bits on {bits.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= 8 * bits.shape[1]:
        raise ValueError(f"k={k!r} columns do not fit bits of {bits.shape[1]} bytes a row")
    check_dtype(dtype)
    check_out(out, (bits.shape[0], k), dtype, bits.device)
    if bits.device.type == "cpu" and bits.numel():
        most = int(popcount(bits).max())
        if most > values.shape[1]:
            raise ValueError(f"a row keeps {most} values but values holds {values.shape[1]} a row")


def unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [N, KB] -> bool [N, 8 * KB]: column j is bit j % 8 of byte j // 8 (LSB first)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).bool().reshape(*bits.shape[:-1], 8 * bits.shape[-1])


def popcount(bits: torch.Tensor) -> torch.Tensor:
    """Kept values per row: int64 [N]."""
    return unpack_bits(bits).sum(-1)


def bitmap_expand(bits, values, k: int, dtype: torch.dtype, out=None) -> torch.Tensor:
    """bits uint8 [N, KB], values [N, C] -> W [N, k] in `dtype` (see the module docstring)."""
    check_args(bits, values, k, dtype, out)
    keep = unpack_bits(bits)[:, :k]
    # A kept column's index into its row's values is the number of kept columns up to it, minus one;
    # pruned columns get a clamped index whose gathered value torch.where discards.
    idx = (keep.cumsum(1) - 1).clamp_(0, max(values.shape[1] - 1, 0))
    if values.shape[1]:
        w = torch.where(keep, values.gather(1, idx).to(dtype), torch.zeros((), dtype=dtype, device=bits.device))
    else:  # nothing kept anywhere
        w = torch.zeros(bits.shape[0], k, dtype=dtype, device=bits.device)
    if out is None:
        return w
    out.copy_(w)
    return out


def bitmap_pack(dense: torch.Tensor, keep: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dense [N, K] and a bool mask keep [N, K] -> (bits uint8 [N, ceil(K/8)], values [N, count] in dense's
    dtype): the kept entries of each row in column order, zero-padded to `count` (default: the largest
    per-row count)."""
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2 or not dense.is_floating_point():
        raise TypeError(f"dense must be a float tensor [N, K], got {_desc(dense)}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != dense.shape:
        raise TypeError(f"keep must be a bool tensor {tuple(dense.shape)}, got {_desc(keep)}")
    if keep.device != dense.device:
        raise ValueError(f"keep is on {keep.device} but dense on {dense.device}")
    n, kk = dense.shape
    kb = -(-kk // 8)
    padded = torch.zeros(n, 8 * kb, dtype=torch.uint8, device=dense.device)
    padded[:, :kk] = keep
    shifts = torch.arange(8, dtype=torch.uint8, device=dense.device)
    bits = (padded.view(n, kb, 8) << shifts).sum(-1).to(torch.uint8)  # distinct bits: the sum is an OR
    counts = keep.sum(1)
    most = int(counts.max()) if n else 0
    count = most if count is None else count
    if count < most:
        raise ValueError(f"count {count} is below the {most} values a row keeps")
    values = torch.zeros(n, count, dtype=dense.dtype, device=dense.device)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: each row's columns in increasing order
    slot = keep.cumsum(1)[rows, cols] - 1
    values[rows, slot] = dense[rows, cols]
    return bits, values


__all__ = ["bitmap_expand", "bitmap_pack", "check_args", "popcount", "unpack_bits"]
