"""The bitsandbytes 4-bit formats, "nf4" (NormalFloat4, QLoRA's) and "fp4": each linear layer's weight
W [N, K] in blocks of `blocksize` consecutive inputs of a row, every value a 4-bit index into a fixed code
book of 16 floats in [-1, 1], scaled by its block's absolute maximum: W ~ code[q] * absmax. Names: "nf4"
and "fp4" (blocks of 64, bitsandbytes' default), "nf4-g128", "fp4-g32", ... (any block size bitsandbytes
takes, 32 to 4096; "-g" as the other formats name their group).

Stored per weight (bitsandbytes' own bytes, reshaped so that the format is row-wise):
- "<w>.nf4" (or "<w>.fp4"): uint8 [N, K / 2], two indices per byte, bitsandbytes' order: input 2j of a
  row in the HIGH nibble of byte j, input 2j+1 in the low one (the int4 format has it the other way);
- "<w>.absmax": float32 [N, K / blocksize], plain statistics (no nested, double-quantized absmax).
bitsandbytes quantizes the flattened tensor block by block; with K a multiple of the blocksize no block
straddles two rows, so a row slice of W (hot/cold neurons, a disk read of part of a module) is a row slice
of both stored tensors, as the store requires. A weight whose K is not a multiple of the blocksize is kept
dense in the compute dtype (as are the weights int8.py's `quantizable` leaves dense).

Nothing else is saved: the rest of bitsandbytes' QuantState (code book, blocksize, quant type, shape, the
output dtype) follows from the format and the stored shapes, and is rebuilt at compute time (`quant_state`).

encode quantizes the checkpoint's values in float32 (bitsandbytes' CPU quantizer computes in float32
whatever it is given; rounding to a bf16 compute dtype first would only add a second rounding), and
refuses a weight that is not finite or whose block maximum the compute dtype cannot hold.

The arithmetic (`dequantize`; `dequantize_torch` spells it out without bitsandbytes, for a Triton kernel
to reproduce): code[q] * absmax in float32, rounded once to the compute dtype. `linear` is x @ W.T (+ b):
- on the GPU through `bitsandbytes.matmul_4bit`, which picks per shape between its fused 4-bit GEMM
  (reads the packed bytes only: few rows, e.g. MoE experts that got few tokens, short waves) and
  dequantize-into-a-temporary + cuBLAS (many rows, where the GEMM's FLOPs dwarf the extra write and read
  of one weight in the compute dtype), by thresholds bitsandbytes calibrates per GPU architecture;
  dequantize_4bit + F.linear is its own fallback, so it can only gain on that. It equals the twin up to
  the GEMM's summation order;
- on the CPU as dequantize + F.linear (what matmul_4bit does there too), equal to the twin exactly.
MoE experts run one by one (no grouped kernels: `grouped_experts` stays False).

bitsandbytes is imported only when a weight is encoded or computed with, so offbatch imports, plans and
sizes these formats without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from offbatch.errors import OffbatchError
from offbatch.formats.base import WeightFormat, register_family, register_format
from offbatch.formats.int8 import quantizable

BNB_VERSION = "0.50.2"
DEFAULT_BLOCKSIZE = 64
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes' kernels take

# The code books, index -> value, as bitsandbytes builds them (functional.get_4bit_type: these floats as
# float32, divided by their largest magnitude). NF4: quantiles of N(0, 1), sorted, normalised to [-1, 1].
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# FP4: 1 sign bit, 2 exponent bits, 1 mantissa bit, in bit-pattern order (not sorted), divided by 12.
FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
CODE_VALUES = {"nf4": NF4_VALUES, "fp4": FP4_VALUES}

_code_books: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_book(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 float32 values an index stands for (cached per device: built once, not copied per call)."""
    key = (quant_type, torch.device(device))
    if key not in _code_books:
        values = torch.tensor(CODE_VALUES[quant_type], dtype=torch.float32)
        _code_books[key] = (values / values.abs().max()).to(key[1])
    return _code_books[key]


def bitsandbytes_module(fmt_name: str):
    """bitsandbytes, imported on first use; a clear error where it is not installed."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (the submodule the formats call)
    except ImportError as e:
        raise OffbatchError(f"the {fmt_name} weight format needs bitsandbytes, which cannot be imported ({e}): "
                            f"install it with `pip install bitsandbytes=={BNB_VERSION}`") from e
    return bitsandbytes


def unpack_indices(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] uint8 -> [N, K] indices in [0, 15] (byte j: input 2j high nibble, 2j+1 low)."""
    return torch.stack((packed >> 4, packed & 15), dim=-1).reshape(packed.shape[0], -1)


class Bnb4Format(WeightFormat):
    absmax_dtype = torch.float32  # what bitsandbytes' kernels read; 4 bytes per block of blocksize / 2 bytes
    expands = True
    fused_rows = 1  # matmul_4bit's fused 4-bit kernel serves one row; more expand into a temporary
    encodes_anywhere = False  # bitsandbytes' CPU and CUDA quantizers are separate kernels

    def __init__(self, quant_type: str = "nf4", blocksize: int = DEFAULT_BLOCKSIZE, name: str | None = None):
        if quant_type not in CODE_VALUES:
            raise ValueError(f"a bitsandbytes 4-bit format is nf4 or fp4, not {quant_type!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"bitsandbytes takes blocks of {', '.join(map(str, BLOCKSIZES))} inputs, not {blocksize}")
        self.quant_type, self.blocksize = quant_type, blocksize
        # "-g": the blocksize is what the other formats call their group (convert's --group)
        self.name = name or quant_type + ("" if blocksize == DEFAULT_BLOCKSIZE else f"-g{blocksize}")

    def compresses(self, local, shape):
        return quantizable(local, tuple(shape)) and shape[1] % self.blocksize == 0

    def stored(self, local, shape, dtype):
        if not self.compresses(local, shape):
            return super().stored(local, shape, dtype)
        n, k = shape
        return [(f"{local}.{self.quant_type}", (n, k // 2), torch.uint8),
                (f"{local}.absmax", (n, k // self.blocksize), self.absmax_dtype)]

    def encode(self, local, tensor, dtype):
        if not self.compresses(local, tuple(tensor.shape)):
            return super().encode(local, tensor, dtype)
        n, k = tensor.shape
        t = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise ValueError(f"{local}: weights not finite, {self.name} cannot store them")
        bnb = bitsandbytes_module(self.name)
        packed, state = bnb.functional.quantize_4bit(t, blocksize=self.blocksize, compress_statistics=False,
                                                     quant_type=self.quant_type)
        absmax = state.absmax.to(self.absmax_dtype).reshape(n, k // self.blocksize)
        # |code| <= 1: every value fits the compute dtype when its block's maximum does.
        if not torch.isfinite(absmax.to(dtype)).all():
            raise ValueError(f"{local}: weights too large for {self.name} in {dtype} (largest magnitude "
                             f"{absmax.max().item():.4g})")
        return {f"{local}.{self.quant_type}": packed.reshape(n, k // 2), f"{local}.absmax": absmax}

    def quant_state(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype):
        """bitsandbytes' QuantState of the weight `local` ("q.weight"), rebuilt from the stored absmax:
        plain statistics, the format's code book and blocksize, shape [N, K], dequantizing to `dtype`."""
        bnb = bitsandbytes_module(self.name)
        packed, absmax = w[f"{local}.{self.quant_type}"], w[f"{local}.absmax"]
        return bnb.functional.QuantState(
            absmax=absmax.reshape(-1), shape=torch.Size((packed.shape[0], packed.shape[1] * 2)),
            code=code_book(self.quant_type, absmax.device), blocksize=self.blocksize,
            quant_type=self.quant_type, dtype=dtype)

    def dequantize(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype,
                   in_features: int | None = None) -> torch.Tensor:
        """The weight `local` ("q.weight") back in `dtype`, by bitsandbytes: code[q] * absmax in float32,
        rounded once (in_features: as the other formats take it; nothing is padded here)."""
        bnb = bitsandbytes_module(self.name)
        # As one column [N * K / 2, 1]: bitsandbytes transposes its output for a packed tensor of one row.
        packed = w[f"{local}.{self.quant_type}"].reshape(-1, 1)
        return bnb.functional.dequantize_4bit(packed, self.quant_state(w, local, dtype))

    def dequantize_torch(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize` in plain torch (no bitsandbytes): the code-book lookup a kernel reproduces."""
        absmax = w[f"{local}.absmax"].float()
        n, blocks = absmax.shape
        q = unpack_indices(w[f"{local}.{self.quant_type}"]).long()
        values = code_book(self.quant_type, absmax.device)[q].view(n, blocks, self.blocksize)
        return (values * absmax[..., None]).view(n, -1).to(dtype)

    def linear(self, x, w, name):
        if f"{name}.weight.{self.quant_type}" not in w:
            return super().linear(x, w, name)
        bias = w.get(f"{name}.bias")
        if x.device.type == "cuda":
            bnb = bitsandbytes_module(self.name)
            packed = w[f"{name}.weight.{self.quant_type}"]
            return bnb.matmul_4bit(x, packed.reshape(-1, 1), quant_state=self.quant_state(w, f"{name}.weight", x.dtype),
                                   bias=None if bias is None else bias.to(x.dtype))
        return F.linear(x, self.dequantize(w, f"{name}.weight", x.dtype), bias)


def parse_bnb4(name: str) -> Bnb4Format | None:
    """"nf4", "fp4", "nf4-g128", "fp4-g32": a block of one of bitsandbytes' sizes."""
    m = re.fullmatch(r"(nf4|fp4)(?:-g(\d+))?", name)
    if m is None or (m.group(2) is not None and int(m.group(2)) not in BLOCKSIZES):
        return None
    fmt = Bnb4Format(m.group(1), int(m.group(2) or DEFAULT_BLOCKSIZE))
    return fmt if fmt.name == name else None  # one name per format ("nf4-g64" is "nf4")


register_family(parse_bnb4)
NF4 = register_format(Bnb4Format("nf4"))
FP4 = register_format(Bnb4Format("fp4"))
