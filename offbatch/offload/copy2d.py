"""Strided host-to-device copies as one DMA request (the CUDA driver's cuMemcpy2DAsync).

torch copies a non-contiguous pinned tensor to the GPU by first making it contiguous on the host (a CPU
copy into pageable memory, then a slow pageable transfer). Host KV is laid out [slots, kv heads,
positions, row], and a decode step needs only each slot's first `length` positions: one row of
length * row bytes per (slot, head) at a fixed pitch, which is exactly what a 2D copy describes. The
driver is reached through ctypes (libcuda is loaded by any CUDA process; its 2D copy call and struct are
stable across CUDA versions); where it cannot be found, `available()` is False and callers copy whole
ranges instead.
"""

from __future__ import annotations

import ctypes
import os

import torch

_CU_MEMORYTYPE_HOST = 1
_CU_MEMORYTYPE_DEVICE = 2


class _Memcpy2D(ctypes.Structure):  # CUDA_MEMCPY2D (cuda.h)
    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


_driver = None


def live_copies_enabled() -> bool:
    """OFFBATCH_KV_COPY_LIVE=0 copies whole slot ranges (the old path, for A/B runs); the planner prices
    what this says."""
    return os.environ.get("OFFBATCH_KV_COPY_LIVE", "1") != "0"


def _memcpy2d_async():
    global _driver
    if _driver is None:
        fn = False
        if torch.cuda.is_available():
            try:
                lib = ctypes.CDLL("libcuda.so.1")
                fn = lib.cuMemcpy2DAsync_v2
                fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _driver = fn
    return _driver


def available() -> bool:
    """A strided pinned-host-to-device copy can be issued as one request, and live copies are enabled."""
    return live_copies_enabled() and bool(_memcpy2d_async())


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(rows, pitch in bytes) of t seen as rows over its last two dims' leading part: every dim before
    the second-to-last must collapse into one run of rows at a fixed pitch."""
    lead = t.shape[:-2]
    pitch = t.stride(-3) if t.dim() >= 3 else t.shape[-2] * t.stride(-2)
    expect = pitch
    for size, stride in zip(reversed(lead), reversed(t.stride()[:-2])):
        if size > 1 and stride != expect:
            raise ValueError(f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is not rows at one pitch")
        expect *= size
    rows = 1
    for size in lead:
        rows *= size
    return rows, pitch * t.element_size()


def copy_prefix(dst: torch.Tensor, src: torch.Tensor, length: int, stream: torch.cuda.Stream | None = None) -> None:
    """dst[..., :length, :] = src[..., :length, :] for pinned host src and device dst of the same shape
    except the second-to-last dim, each [..., positions, row] with a contiguous row and one pitch between
    consecutive leading rows; issued on `stream` (default: the current one), non-blocking."""
    if src.shape[:-2] != dst.shape[:-2] or src.shape[-1] != dst.shape[-1] or src.dtype != dst.dtype:
        raise ValueError(f"copy_prefix: shapes {tuple(src.shape)} -> {tuple(dst.shape)} do not match")
    if length > min(src.shape[-2], dst.shape[-2]) or src.stride(-1) != 1 or dst.stride(-1) != 1:
        raise ValueError("copy_prefix: length beyond the tensors or rows not contiguous")
    if src.stride(-2) != src.shape[-1] or dst.stride(-2) != dst.shape[-1]:
        raise ValueError("copy_prefix: positions are not consecutive rows")
    rows, src_pitch = _rows(src)
    rows_d, dst_pitch = _rows(dst)
    width = length * src.shape[-1] * src.element_size()
    if rows == 0 or width == 0:
        return
    fn = _memcpy2d_async()
    if not fn:
        raise RuntimeError("copy_prefix: the CUDA driver's 2D copy is not available")
    p = _Memcpy2D()
    p.srcMemoryType, p.srcHost, p.srcPitch = _CU_MEMORYTYPE_HOST, src.data_ptr(), src_pitch
    p.dstMemoryType, p.dstDevice, p.dstPitch = _CU_MEMORYTYPE_DEVICE, dst.data_ptr(), dst_pitch
    p.WidthInBytes, p.Height = width, rows
    s = stream if stream is not None else torch.cuda.current_stream(dst.device)
    err = fn(ctypes.byref(p), ctypes.c_void_p(s.cuda_stream))
    if err != 0:
        raise RuntimeError(f"cuMemcpy2DAsync failed with CUDA error {err} (rows {rows}, width {width} B, "
                           f"pitches {src_pitch}/{dst_pitch} B)")
