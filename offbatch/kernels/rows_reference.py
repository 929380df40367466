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


# ---- scatter_tokens ------------------------------------------------------------------------------------
# Contract (scatter_tokens): one new row per sequence into a KV layout.
#   src    [n, H, C]     the rows (K or V of the step's new tokens, as stored: values or packed bytes), on the
#                        compute device, each [C] contiguous
#   slots  [n], pos [n]  integer slot and position of row j, on src's device
#   dst    [S, H, P, C]  the layout (host KV of one layer), C contiguous; on a GPU the Triton kernel writes a
#                        pinned host `dst` in place over the bus (its pages are mapped into the device's address
#                        space): no copy back, no host thread
# dst[slots[j], :, pos[j], :] = src[j] for every j (a copy: bit-exact); (slot, pos) pairs must be distinct.
# The twin copies the rows and indexes where dst lives.


def check_scatter_args(src, slots, pos, dst) -> None:
    if not isinstance(dst, torch.Tensor) or dst.dim() != 4 or dst.stride(3) != 1:
        raise ValueError(f"scatter_tokens: dst must be [S, H, P, C] with C contiguous, got "
                         f"{getattr(dst, 'shape', type(dst).__name__)}")
    if not isinstance(src, torch.Tensor) or src.dim() != 3 or src.shape[1:] != (dst.shape[1], dst.shape[3]) \
            or src.dtype != dst.dtype or src.stride(2) != 1:
        raise ValueError(f"scatter_tokens: src must be [n, {dst.shape[1]}, {dst.shape[3]}] {dst.dtype} with rows "
                         f"contiguous, got {tuple(getattr(src, 'shape', ()))} {getattr(src, 'dtype', None)}")
    for name, t in (("slots", slots), ("pos", pos)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() != src.shape[0] \
                or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"scatter_tokens: {name} must be a 1-D int32/int64 tensor of {src.shape[0]} entries")
        if t.device != src.device:
            raise ValueError(f"scatter_tokens: {name} ({t.device}) and src ({src.device}) must share a device")


def scatter_tokens(src: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    check_scatter_args(src, slots, pos, dst)
    if src.shape[0]:
        dst[slots.to(dst.device), :, pos.to(dst.device)] = src.to(dst.device)
    return dst
