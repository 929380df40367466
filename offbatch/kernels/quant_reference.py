"""Plain-torch twins of the quantized-weight kernels (offbatch/kernels/quant_triton.py): same signatures,
same contract, no Triton. They take the stored tensors of offbatch/formats/int4.py and int8.py as plain
tensors and reproduce those formats' `dequantize` arithmetic exactly.

Stored weights (one linear layer; a leading stack dimension [S, ...] where a function says so):
  int4  q4 uint8 [N, Kp/2] (byte j: input 2j in the low nibble, 2j+1 in the high one), scale [N, G] and,
        asymmetric, minimum [N, G] (float16 as stored; any float dtype is taken), Kp = G * group.
        W = (nib - 8) * scale (symmetric) or nib * scale + minimum (asymmetric).
  int8  q8 int8 [N, Kp], scale [N, G] (float32 [N, 1] per row, float16 per group), group = Kp / G.
        W = q * scale.
Only the first k inputs of a row are used (k <= Kp; the format pads K up to whole groups).

Arithmetic: the integer part and the scales (and minimums) to float32, combined there (q * scale, then
+ minimum), rounded once to the compute dtype; then the GEMM in the compute dtype (fp32 accumulation).
Every product q * scale of a float16 scale is exact in float32 (at most 8 + 11 significant bits), so the
only roundings are the + minimum and the final one.

A weight argument of the grouped functions is a tuple (q, scale, minimum) of [S, ...] stacks (minimum
None: symmetric; int8 takes (q8, scale) or (q8, scale, None)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offbatch.kernels import reference

COMPUTE_DTYPES = reference.GEMM_DTYPES
QuantStack = tuple  # (q, scale, minimum or None): one weight's stored tensors, [S, ...] stacks


# ------------------------------------------------------------------------------------------ arg checks

def int4_width(q4: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, group: int) -> int:
    """Check an int4 weight's stored tensors ([..., N, Kp/2], [..., N, G]) and return Kp."""
    if not isinstance(q4, torch.Tensor) or q4.dtype != torch.uint8 or q4.dim() < 2:
        raise TypeError(f"q4 must be a uint8 tensor [..., N, Kp/2], got {_desc(q4)}")
    _check_scales(q4, scale, minimum)
    kp = 2 * q4.shape[-1]
    if not isinstance(group, int) or group <= 0 or group % 2 or scale.shape[-1] * group != kp:
        raise ValueError(f"group {group} does not fit q4 {tuple(q4.shape)} (Kp={kp}) with {scale.shape[-1]} scales "
                         "a row")
    return kp


def int8_group(q8: torch.Tensor, scale: torch.Tensor) -> int:
    """Check an int8 weight's stored tensors ([..., N, Kp], [..., N, G]) and return its group (Kp / G)."""
    if not isinstance(q8, torch.Tensor) or q8.dtype != torch.int8 or q8.dim() < 2:
        raise TypeError(f"q8 must be an int8 tensor [..., N, Kp], got {_desc(q8)}")
    _check_scales(q8, scale, None)
    kp, g = q8.shape[-1], scale.shape[-1]
    if g == 0 or kp % g:
        raise ValueError(f"q8 {tuple(q8.shape)}: {g} scales a row do not split its {kp} inputs into whole groups")
    return kp // g


def _check_scales(q, scale, minimum):
    for name, t in (("scale", scale), ("minimum", minimum)):
        if t is None and name == "minimum":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {_desc(t)}")
        if t.dim() != q.dim() or t.shape[:-1] != q.shape[:-1] or t.shape[-1] == 0:
            raise ValueError(f"{name} {tuple(t.shape)} does not match the packed values {tuple(q.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but the packed values are on {q.device}")
    if minimum is not None and minimum.shape != scale.shape:
        raise ValueError(f"minimum {tuple(minimum.shape)} and scale {tuple(scale.shape)} differ")


def check_k(k: int, kp: int) -> None:
    if not 0 < k <= kp:
        raise ValueError(f"{k} inputs do not fit a stored row of {kp}")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dequantize to float16, bfloat16 or float32, not {dtype}")


def check_x(x: torch.Tensor, q: torch.Tensor, kp: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"x must be a float16, bfloat16 or float32 tensor [..., K], got {_desc(x)}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device} but the weight is on {q.device}")
    check_k(x.shape[-1], kp)


def check_bias(bias: torch.Tensor | None, x: torch.Tensor, n: int) -> None:
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be a [{n}] tensor on {x.device}, got {_desc(bias)}")


def check_out(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {_desc(out)}")
    if out.dtype != dtype or out.device != device:
        raise TypeError(f"out must be {dtype} on {device}, got {out.dtype} on {out.device}")


def unpack_stack(w: QuantStack) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(w, (tuple, list)) or len(w) not in (2, 3):
        raise TypeError(f"a quantized weight stack is a tuple (q, scale[, minimum]), got {type(w).__name__}")
    return w[0], w[1], (w[2] if len(w) == 3 else None)


def check_grouped(x, weights, group_offsets, group_slots, out, check_values=False) -> None:
    """The grouped-GEMM contract (offbatch/kernels/reference.py) for quantized stacks: each weight a
    [S, N, ...] stack; the dense checks run on a zero-size stand-in [S, N, K] of x's dtype."""
    first = weights[0][0]
    for q, *_ in weights:
        if q.dim() != 3 or q.shape != first.shape:
            raise ValueError(f"quantized stacks must be [S, N, ...] and alike, got {tuple(q.shape)} and "
                             f"{tuple(first.shape)}")
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        proxy = x.new_empty(1).expand(first.shape[0], first.shape[1], x.shape[1])
        reference.check_grouped_args(x, tuple(proxy for _ in weights), group_offsets, group_slots, out, check_values)
    else:
        raise ValueError(f"x must be a 2-D tensor [T, K], got {_desc(x)}")


def _desc(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


# ------------------------------------------------------------------------------------------ dequantize

def unpack_nibbles(q4: torch.Tensor) -> torch.Tensor:
    """uint8 [..., M] -> [..., 2M] values in [0, 15] (byte j: 2j low nibble, 2j+1 high)."""
    return torch.stack((q4 & 15, q4 >> 4), dim=-1).reshape(*q4.shape[:-1], 2 * q4.shape[-1])


def _per_group(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """float32 [..., Kp] values with a per-group tensor [..., G] broadcast over each group: [..., G, group]."""
    return values.view(*values.shape[:-1], t.shape[-1], -1)


def _finish(w: torch.Tensor, k: int, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    w = w.reshape(*w.shape[:-2], -1)[..., :k].to(dtype)
    if out is None:
        return w
    out.copy_(w)
    return out


def dequant_int4(q4, scale, minimum, group: int, k: int, dtype: torch.dtype, out=None) -> torch.Tensor:
    """int4 weight [..., N, Kp/2] -> W [..., N, k] in `dtype` (minimum None: symmetric)."""
    kp = int4_width(q4, scale, minimum, group)
    check_k(k, kp)
    check_dtype(dtype)
    check_out(out, (*q4.shape[:-1], k), dtype, q4.device)
    t = _per_group(unpack_nibbles(q4).float(), scale)
    if minimum is None:
        t = (t - 8) * scale.float()[..., None]
    else:
        t = t * scale.float()[..., None] + minimum.float()[..., None]
    return _finish(t, k, dtype, out)


def dequant_int8(q8, scale, dtype: torch.dtype, out=None, k: int | None = None) -> torch.Tensor:
    """int8 weight [..., N, Kp] -> W [..., N, k] in `dtype` (k: default Kp)."""
    int8_group(q8, scale)
    k = q8.shape[-1] if k is None else k
    check_k(k, q8.shape[-1])
    check_dtype(dtype)
    check_out(out, (*q8.shape[:-1], k), dtype, q8.device)
    t = _per_group(q8.float(), scale) * scale.float()[..., None]
    return _finish(t, k, dtype, out)


# ---------------------------------------------------------------------------------------------- linear

def int4_linear(x, q4, scale, minimum, group: int, bias=None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype, W the int4 weight's first K inputs (split_k: the
    kernel's K ranges; one GEMM here)."""
    kp = int4_width(q4, scale, minimum, group)
    check_x(x, q4, kp)
    check_bias(bias, x, q4.shape[0])
    return F.linear(x, dequant_int4(q4, scale, minimum, group, x.shape[-1], x.dtype), bias)


def int8_linear(x, q8, scale, bias=None, split_k: int | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype, W the int8 weight's first K inputs."""
    int8_group(q8, scale)
    check_x(x, q8, q8.shape[-1])
    check_bias(bias, x, q8.shape[0])
    return F.linear(x, dequant_int8(q8, scale, x.dtype, k=x.shape[-1]), bias)


# --------------------------------------------------------------------------------------------- grouped
# The grouped contract of offbatch/kernels/reference.py, with quantized [S, N, ...] stacks: the twin
# dequantizes the stacks to x's dtype and runs the dense grouped twin (fp32 products, one rounding).

def _dense_int4(w: QuantStack, group: int, k: int, dtype) -> torch.Tensor:
    q4, scale, minimum = unpack_stack(w)
    return dequant_int4(q4, scale, minimum, group, k, dtype)


def _dense_int8(w: QuantStack, k: int, dtype) -> torch.Tensor:
    q8, scale, _ = unpack_stack(w)
    return dequant_int8(q8, scale, dtype, k=k)


def grouped_gemm_int4(x, w: QuantStack, group_offsets, group_slots, group: int, out=None) -> torch.Tensor:
    """y[rows of g] = x[rows of g] @ W[group_slots[g]].T, W an int4 stack (q4 [S, N, Kp/2], scale, minimum)."""
    check_grouped(x, (unpack_stack(w),), group_offsets, group_slots, out, check_values=True)
    return reference.grouped_gemm(x, _dense_int4(w, group, x.shape[1], x.dtype), group_offsets, group_slots, out)


def grouped_swiglu_int4(x, w_gate: QuantStack, w_up: QuantStack, group_offsets, group_slots, group: int,
                        out=None) -> torch.Tensor:
    """h[rows of g] = silu(x_g @ gate[s].T) * (x_g @ up[s].T), s = group_slots[g], int4 stacks."""
    check_grouped(x, (unpack_stack(w_gate), unpack_stack(w_up)), group_offsets, group_slots, out, check_values=True)
    k = x.shape[1]
    return reference.grouped_swiglu(x, _dense_int4(w_gate, group, k, x.dtype), _dense_int4(w_up, group, k, x.dtype),
                                    group_offsets, group_slots, out)


def grouped_gemm_int8(x, w: QuantStack, group_offsets, group_slots, out=None) -> torch.Tensor:
    """grouped_gemm_int4's contract with an int8 stack (q8 [S, N, Kp], scale [S, N, G])."""
    check_grouped(x, (unpack_stack(w),), group_offsets, group_slots, out, check_values=True)
    return reference.grouped_gemm(x, _dense_int8(w, x.shape[1], x.dtype), group_offsets, group_slots, out)


def grouped_swiglu_int8(x, w_gate: QuantStack, w_up: QuantStack, group_offsets, group_slots, out=None) -> torch.Tensor:
    """grouped_swiglu_int4's contract with int8 stacks."""
    check_grouped(x, (unpack_stack(w_gate), unpack_stack(w_up)), group_offsets, group_slots, out, check_values=True)
    k = x.shape[1]
    return reference.grouped_swiglu(x, _dense_int8(w_gate, k, x.dtype), _dense_int8(w_up, k, x.dtype),
                                    group_offsets, group_slots, out)
