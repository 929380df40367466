"""Plain-torch twin of offbatch/kernels/rows_triton.py: gathering whole rows of a matrix by index.

Contract (gather_rows):
  src  [N, C]  a row-major matrix (stride 1 along C), on the device or in host memory; on a GPU the Triton
               kernel reads a pinned (page-locked) host `src` in place over the bus, so only the chosen rows
               cross it
  idx  [n]     integer row indices into src, each in [0, N), on out's device
  out  [>= n, C] optional output in src's dtype on the compute device; rows [0, n) are written
Returns out[:n] (a fresh tensor on idx's device when out is None). A gather is a copy: results are
bit-exact.

The twin gathers where src lives and copies the rows over: on a GPU with a host `src` that is the
host threads' gather followed by one copy, the path the kernel replaces.
"""

from __future__ import annotations

import torch


def check_rows_args(src, idx, out) -> None:
    if not isinstance(src, torch.Tensor) or src.dim() != 2 or src.stride(1) != 1:
        raise ValueError(f"gather_rows: src must be a 2-D matrix with contiguous rows, got "
                         f"{getattr(src, 'shape', type(src).__name__)}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError("gather_rows: idx must be a 1-D int32/int64 tensor")
    if out is not None:
        if out.dim() != 2 or out.shape[0] < idx.numel() or out.shape[1] != src.shape[1] or out.dtype != src.dtype \
                or out.stride(1) != 1:
            raise ValueError(f"gather_rows: out must be [>= {idx.numel()}, {src.shape[1]}] {src.dtype} with contiguous "
                             f"rows, got {tuple(out.shape)} {out.dtype}")
        if out.device != idx.device:
            raise ValueError(f"gather_rows: idx ({idx.device}) and out ({out.device}) must share a device")


def gather_rows(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    check_rows_args(src, idx, out)
    n = idx.numel()
    rows = torch.index_select(src, 0, idx.to(src.device))
    if out is None:
        return rows.to(idx.device)
    out[:n].copy_(rows, non_blocking=False)
    return out[:n]
