"""MoE experts through the grouped kernels: each expert that got tokens runs once over all of its rows,
a chunk of experts per launch, weights read in place from the prefetcher's banks.

The rows of the layer are sorted by expert (L.group_by_expert), so a chunk of consecutive experts owns
one contiguous range of sorted rows and each expert one group in it. A chunk is taken from one bank (the
expert slot ring, or one layer's resident experts), seen as strided [rows, N, K] stacks of gate, up and
down; each group names its expert's row. Streamed chunks hold at most ring size - 1 experts, so while a
chunk computes, the copy stream fills the free slot with the next expert.

Only gated SiLU experts (every MoE family supported) of exactly gate, up and down, stored in a format with
grouped kernels (dense, int8, int4: `WeightFormat.grouped_experts`), take this path; anything else runs
the per-expert loop (moe_loop.py; see `expert_items`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from offbatch import kernels
from offbatch.ffn.base import register_ffn
from offbatch.ffn.moe import MoEBackend
from offbatch.formats import Item
from offbatch.kernels import reference
from offbatch.models.catalogue import ModuleKey
from offbatch.models.spec import ModelSpec

Items = tuple[Item, ...]  # the experts' layout, "experts.E." stripped from the names


def gated_silu(spec: ModelSpec, dtype) -> bool:
    """The kernels' function (gated SiLU experts) in a dtype they take."""
    return spec.moe is not None and spec.gated_ffn and spec.activation == "silu" and dtype in reference.GEMM_DTYPES


def expert_items(spec: ModelSpec, store) -> Items | None:
    """The one layout shared by every routed expert of the model with its "experts.E." prefixes
    stripped, or None when the grouped path does not apply (not gated SiLU, a dtype the kernels do not
    take, a format without grouped kernels, tensors besides gate, up and down such as biases, layouts
    that differ)."""
    if not gated_silu(spec, store.dtype):
        return None
    inter, hidden = spec.moe.expert_intermediate_size, spec.hidden_size
    expected = store.format.layout([("down.weight", (hidden, inter)), ("gate.weight", (inter, hidden)),
                                    ("up.weight", (inter, hidden))], store.dtype).items
    shared: Items | None = None
    for key in store.keys():
        if not key[1].startswith("expert."):
            continue
        prefix = f"experts.{key[1].split('.', 1)[1]}."
        layout = store.layouts[key]
        items = tuple(Item(it.name.removeprefix(prefix), tuple(it.shape), it.dtype, it.offset) for it in layout.items)
        if not store.format.grouped_experts or items != expected or (shared is not None and items != shared):
            return None
        shared = items
    return shared


@dataclass(frozen=True)
class Chunk:
    experts: tuple[int, ...]  # consecutive experts with tokens, all read from one bank
    bounds: tuple[int, ...]  # sorted-row boundaries: expert j owns bounds[j]:bounds[j+1]


def plan_chunks(counts: list[int], bank_of: Callable[[int], object], max_experts: Callable[[object], int]) -> list[Chunk]:
    """Cut the experts that got tokens into chunks: consecutive in expert order (so their rows are
    contiguous), one bank each, at most max_experts(bank) experts each."""
    chunks: list[Chunk] = []
    experts: list[int] = []
    bounds: list[int] = []
    bank = None
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        b = bank_of(e)
        if experts and (b is not bank or len(experts) >= max_experts(bank)):
            chunks.append(Chunk(tuple(experts), tuple(bounds + [start])))
            experts, bounds = [], []
        if not experts:
            bank = b
        experts.append(e)
        bounds.append(start)
        start += n
    if experts:
        chunks.append(Chunk(tuple(experts), tuple(bounds + [start])))
    return chunks


def windows(bounds: tuple[int, ...], rows: list[int], step: int):
    """Split a chunk's sorted rows [bounds[0], bounds[-1]) into windows of at most `step` rows (the
    planned FFN micro-batch). Yields (lo, hi, offsets, slots) with group offsets relative to lo, only
    for the groups that have rows in the window; rows[j] is group j's bank row."""
    lo_all, hi_all = bounds[0], bounds[-1]
    for lo in range(lo_all, hi_all, step):
        hi = min(lo + step, hi_all)
        offsets, slots = [0], []
        for j, row in enumerate(rows):
            a, b = max(bounds[j], lo), min(bounds[j + 1], hi)
            if b > a:
                slots.append(row)
                offsets.append(b - lo)
        yield lo, hi, offsets, slots


@register_ffn
class GroupedMoE(MoEBackend):
    """Runs a MoE layer's routed experts through grouped_swiglu + grouped_gemm, over a prefetcher's
    banks (`modules.pf`; its store `modules.store`).

    `kernels` is offbatch.kernels (Triton on CUDA tensors) on a GPU and the torch twins on the CPU:
    Triton on the CPU is the interpreter, a test tool far slower than the twins. Tests set
    `kernels = offbatch.kernels` with TRITON_INTERPRET=1 to run the Triton kernels in the engine.
    """

    name = "moe-grouped"

    def __init__(self, spec: ModelSpec, modules, micro_tokens: int):
        super().__init__(spec, modules, micro_tokens)
        self.store, self.pf, self.device = modules.store, modules.pf, modules.device
        self.items = expert_items(spec, self.store)
        self.kernels = kernels if self.device.type == "cuda" else reference
        self._stacks: dict[int, dict[str, torch.Tensor]] = {}  # id(bank) -> stacked weights
        self.launches = 0  # grouped_swiglu calls, for tests and stats

    @classmethod
    def applies(cls, spec: ModelSpec, dtype) -> bool:
        return gated_silu(spec, dtype)

    @classmethod
    def runs_on(cls, spec: ModelSpec, modules) -> bool:
        """It reads experts in place from a prefetcher's banks, in a format with grouped kernels (`expert_items`)."""
        return getattr(modules, "pf", None) is not None and expert_items(spec, modules.store) is not None

    def _stack(self, bank: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self._stacks.get(id(bank))
        if s is None:
            s = self._stacks[id(bank)] = self.store.format.expert_stacks(bank, self.items)
        return s

    def _max_experts(self, bank) -> int:
        ring = self.pf.banks.get("expert")
        if ring is not None and bank is ring:
            return max(1, self.pf.ring_size("expert") - 1)  # one slot left copying the next expert
        return 1 << 30  # resident: nothing to wait for

    def experts(self, layer: int, h: torch.Tensor, order: torch.Tensor, counts: list[int], flat_w: torch.Tensor,
                out: torch.Tensor) -> None:
        """Host work uses only `counts`; offsets and bank rows travel to the device as one small
        non-blocking copy per window."""
        k = self.spec.moe.top_k
        rows_sorted = order // k
        w_sorted = flat_w[order]

        def key(e: int) -> ModuleKey:
            return layer, f"expert.{e}"

        for chunk in plan_chunks(counts, lambda e: self.pf.bank_of(key(e)), self._max_experts):
            for e in chunk.experts:
                self.mods.acquire(key(e))  # the compute stream waits for each copy
            placed = [self.pf.row_of(key(e)) for e in chunk.experts]
            w = self._stack(placed[0][0])
            for lo, hi, offsets, slots in windows(chunk.bounds, [row for _, row in placed], self.micro_tokens):
                groups = torch.tensor(offsets + slots, dtype=torch.int32).to(self.device, non_blocking=True)
                g_offsets, g_slots = groups[: len(offsets)], groups[len(offsets):]
                x = h.index_select(0, rows_sorted[lo:hi])
                a = self.store.format.grouped_swiglu(self.kernels, x, w, g_offsets, g_slots)
                y = self.store.format.grouped_gemm(self.kernels, a, w, g_offsets, g_slots)
                out.index_add_(0, rows_sorted[lo:hi], y * w_sorted[lo:hi, None])
                self.launches += 1
            for e in chunk.experts:
                self.mods.release(key(e))  # after the chunk's launches were issued
