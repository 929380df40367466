"""Weight formats: how a module's tensors are stored as bytes, and the compute that reads them.

A format turns each logical tensor of a module (a linear layer's weight, a bias, a norm) into one or
more stored tensors, each of its own dtype (values, scales, bitmaps); `pack` lays the stored tensors of a
module out in one flat byte buffer - the unit that is placed on a tier and crosses PCIe - by the one
packing rule below. On the device a slot's bytes are seen through the layout (`Layout.views`) and
handed to model code as `ModuleWeights`, whose `linear` is the format's: the model code never learns
how a weight is stored.

A new format is one file: a `WeightFormat` subclass, registered with `register_format`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALIGN = 256  # bytes; every stored tensor starts aligned for vectorised loads
EXPAND_EXPERTS = 2  # compressed experts expanded into scratch at once (WeightFormat.grouped_expanded)


@dataclass(frozen=True)
class Item:
    """One stored tensor in a module's flat buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the buffer's start

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """Where each stored tensor of a module sits in its flat buffer, and the buffer's size."""

    items: tuple[Item, ...]
    nbytes: int

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of a uint8 buffer (host or device) holding the module."""
        return {it.name: flat[it.offset : it.offset + it.nbytes].view(it.dtype).view(it.shape) for it in self.items}

    def item(self, name: str) -> Item:
        return next(it for it in self.items if it.name == name)


def dtype_bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize


def padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pack(stored: list[tuple[str, tuple[int, ...], torch.dtype]]) -> Layout:
    """The packing rule: stored tensors in name order, each padded to ALIGN bytes."""
    items, off = [], 0
    for name, shape, dtype in sorted(stored, key=lambda s: s[0]):
        item = Item(name, tuple(shape), dtype, off)
        items.append(item)
        off += padded(item.nbytes)
    return Layout(tuple(items), off)


class ModuleWeights(Mapping):
    """A module's tensors as model code sees them: plain tensors by local name (norms, biases, and
    whatever the format stores), and `linear`, the format's product with a linear layer's weight."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: "WeightFormat"):
        self.tensors, self.format = tensors, fmt

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ W.T (+ b) for the linear layer `name` ("q", "experts.3.up", ...)."""
        return self.format.linear(x, self.tensors, name)


class WeightFormat:
    """How one model's weights are stored. Subclasses override `stored`, `encode` and `linear` for
    the linear layers' weights; everything else (norms, biases, embeddings) stays dense."""

    name = "base"

    def compresses(self, local: str, shape: tuple[int, ...]) -> bool:
        """Whether this format stores the tensor its own way (else: dense in the compute dtype)."""
        return False

    def stored(self, local: str, shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The stored tensors (name, shape, dtype) of one logical tensor, computing in `dtype`."""
        return [(local, tuple(shape), dtype)]

    def encode(self, local: str, tensor: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A logical tensor (host, any dtype) -> its stored tensors, as `stored` names them."""
        return {local: tensor.to(dtype)}

    def unchanged(self, local: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether the tensor is stored as it is, in `dtype`: then its bytes are the checkpoint's
        (converted at most) and the store copies or reads them without `encode`."""
        return self.stored(local, tuple(shape), dtype) == [(local, tuple(shape), dtype)]

    def layout(self, parts: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> Layout:
        """A module's layout from its logical tensors (local name, shape)."""
        return pack([s for local, shape in parts for s in self.stored(local, shape, dtype)])

    def weights(self, views: dict[str, torch.Tensor]) -> ModuleWeights:
        return ModuleWeights(views, self)

    # ---- what the planner prices (planner/cost.py) ------------------------------------------------------
    # A compressed weight is expanded on the device at each use: into a compute-dtype scratch before a
    # cuBLAS GEMM (reading the stored bytes, writing the dense ones), or, for micro-batches of at most
    # `fused_rows` rows, inside a fused dequant-GEMM that costs about what the dense GEMM does.
    expands = False
    fused_rows = 0
    # What an expansion costs, as a fraction of the device-memory rate of its bytes (stored read + dense
    # written): the kernel's own rate and what the step loses around it (scratch, the dense GEMM over it).
    # Dense modules (dequantized into a scratch, then cuBLAS): fitted to the H200's int4 runs; a cheaper
    # price would make the planner take Llama-3-8B int4 with device KV at wave 342, a plan measured at half
    # the rate of the one it takes (BENCHMARKS.md). A format whose expansion is cheaper says so (bitmap.py).
    expand_efficiency = 0.1
    # MoE experts expand on another path (kernels/grouped_gemm_triton.py: two experts at a time into the
    # grouped kernel's operand, no cuBLAS call per expert) and cost less: fitted to the H200's Mixtral-8x7B
    # int4 and nf4 runs, which the dense modules' figure under-predicted by 28-50%.
    expert_expand_efficiency = 0.2
    # Whether `encode` gives the same bytes on any device (plain torch arithmetic): then the store may
    # encode on the GPU. A library's quantizer may round ties differently per device: it encodes on the host.
    encodes_anywhere = True

    def linear(self, x: torch.Tensor, w: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    def dequantize(self, w: Mapping[str, torch.Tensor], local: str, dtype: torch.dtype,
                   in_features: int | None = None) -> torch.Tensor:
        """The torch twin: the compressed weight `local` ("q.weight") decoded from its stored tensors into
        `dtype`, its first in_features inputs (a format may pad them). `linear` equals F.linear over it;
        a folder stored in the format is read through it as logical tensors (loader.Checkpoint.get)."""
        raise NotImplementedError(f"the {self.name} format stores no compressed weights")

    # ---- MoE experts through the grouped kernels (offbatch/ffn/moe_grouped.py) ------------------------
    # A bank is a uint8 buffer [rows, row_bytes] holding one expert module per row, all with one layout;
    # the grouped kernels take a chunk of experts as one [rows, N, K] stack per weight and a row per group.
    grouped_experts = False  # whether this format's experts can run through the grouped kernels

    def expert_stacks(self, bank: torch.Tensor, items: tuple[Item, ...]) -> dict[str, torch.Tensor]:
        """Each stored tensor of a bank's modules as one strided [rows, *shape] view (row r: module r's);
        items: the experts' layout with their "experts.E." prefixes stripped."""
        out = {}
        for it in items:
            size = dtype_bytes(it.dtype)
            flat = bank.view(it.dtype)  # [rows, row_bytes / size]; rows stay row_bytes apart
            n = it.nbytes // size
            out[it.name] = flat[:, it.offset // size : it.offset // size + n].view(bank.shape[0], *it.shape)
        return out

    def grouped_swiglu(self, kernels, x: torch.Tensor, stacks: dict[str, torch.Tensor], offsets: torch.Tensor,
                       slots: torch.Tensor) -> torch.Tensor:
        """silu(x @ gate.T) * (x @ up.T) per group, each group's rows through its expert's stack row."""
        raise NotImplementedError(f"the {self.name} format has no grouped expert kernels")

    def grouped_gemm(self, kernels, a: torch.Tensor, stacks: dict[str, torch.Tensor], offsets: torch.Tensor,
                     slots: torch.Tensor) -> torch.Tensor:
        """a @ down.T per group."""
        raise NotImplementedError(f"the {self.name} format has no grouped expert kernels")

    # ---- compressed experts with many rows: expanded, then the dense grouped kernels ---------------------
    def expand_stack(self, kernels, stacks: dict[str, torch.Tensor], weight: str, rows: torch.Tensor, k: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """The experts `rows` (bank rows, a device tensor) of a weight ("gate.weight") as a dense
        [len(rows), N, k] stack in `dtype`."""
        raise NotImplementedError(f"the {self.name} format does not expand its experts")

    def grouped_expanded(self, kernels, x: torch.Tensor, stacks: dict[str, torch.Tensor], offsets: torch.Tensor,
                         slots: torch.Tensor, weights: tuple[str, ...]) -> torch.Tensor:
        """The dense grouped kernel (SwiGLU over gate and up, or the plain GEMM over down) over the chunk's
        experts expanded into a compute-dtype scratch, EXPAND_EXPERTS experts at a time: past a few dozen
        rows per expert the fused kernel's thin tiles lose to expanding once and running the dense kernel
        (scripts/bench_quant_kernels.py); the scratch stays a couple of experts' dense weights."""
        groups, k = slots.numel(), x.shape[-1]
        out = None
        for g0 in range(0, groups, EXPAND_EXPERTS):
            part = slots[g0 : g0 + EXPAND_EXPERTS]
            dense = [self.expand_stack(kernels, stacks, w, part, k, x.dtype) for w in weights]
            if out is None:
                out = x.new_empty(x.shape[0], dense[0].shape[1])
            local = torch.arange(part.numel(), dtype=slots.dtype, device=slots.device)
            span = offsets[g0 : g0 + part.numel() + 1]
            if len(dense) == 2:
                kernels.grouped_swiglu(x, dense[0], dense[1], span, local, out=out)
            else:
                kernels.grouped_gemm(x, dense[0], span, local, out=out)
        return out if out is not None else x.new_empty(x.shape[0], 0)


FORMATS: dict[str, WeightFormat] = {}
# Formats with parameters in their names ("int4-asym-g32"): a parser per family builds one on first use.
FAMILIES: list[Callable[[str], WeightFormat | None]] = []


def register_format(fmt: WeightFormat) -> WeightFormat:
    """Make a format available by name (plans and model folders name it)."""
    FORMATS[fmt.name] = fmt
    return fmt


def register_family(parse: Callable[[str], "WeightFormat | None"]) -> None:
    """A parser of a family's format names (None: not one of its names)."""
    FAMILIES.append(parse)


def known_format(name: object) -> bool:
    """Whether `name` names a format (registered, or one a family builds)."""
    if not isinstance(name, str):
        return False
    try:
        get_format(name)
    except KeyError:
        return False
    return True


def format_names() -> str:
    """The format names for an error message: the registered ones and the families' patterns."""
    return (", ".join(sorted(FORMATS)) + " (int4 and int8 take a group, nf4/fp4 a block: int4-g32, int4-asym-g128, "
            "int8-g32, nf4-g128; bitmap-P prunes P percent: bitmap-50; +keep=LAYERS keeps layers dense: int4+keep=down,o)")


def get_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        for parse in FAMILIES:
            fmt = parse(name)
            if fmt is not None:
                return register_format(fmt)
    if name not in FORMATS:
        raise KeyError(f"unknown weight format {name!r} (known: {format_names()})")
    return FORMATS[name]
