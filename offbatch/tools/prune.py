"""Pruning for the bitmap formats (formats/bitmap.py): which values of each bulk weight a row keeps.

- magnitude: the largest |W| of each row (the format's own encoding; nothing to compute here);
- wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"): the largest
  |W_ij| * ||X_j||_2 of each row, X_j the j-th input feature of that linear layer over calibration text.
  `input_norms` runs the dense model (the reference forward) over calibration windows and records every
  linear layer's input norms; `wanda_prune` zeroes what a row drops, and the format then keeps exactly the
  non-zeros (the same count per row).

The calibration text is separate from the text quality is measured on: without --calib, convert takes
windows from the end of the evaluation text, which it scores from the start (tools/convert.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from offbatch.tools.model_hooks import hook_linear_inputs

METHODS = ("magnitude", "wanda")
PRUNE_ROWS = 4096  # rows scored at once (each row keeps its own best: blocks change nothing but the memory)
CALIB_WINDOWS = 8  # windows of 512 tokens: 4 096 tokens of calibration, as Wanda's paper used 128 x 2 048 at most


@torch.inference_mode()
def input_norms(model_dir: str | Path, calib_ids: list[list[int]], device: str = "cpu", dtype=None,
                on_window: Callable[[int], None] | None = None) -> dict:
    """||X_j||_2 of every linear layer's inputs over the calibration windows (token id lists), run through
    the dense model: {(module key, local weight name): [K] float32 on the CPU}."""
    from offbatch.engine.reference import ReferenceModel

    model = ReferenceModel.load(model_dir, device=device, dtype=dtype)
    sums: dict = {}

    def record(key, name, x):  # sums[(module key, "q.weight")] += the squared input features, in float32
        flat = x.reshape(-1, x.shape[-1]).float()
        part = (flat * flat).sum(0)
        slot = (key, f"{name}.weight")
        sums[slot] = sums[slot] + part if slot in sums else part
        return x

    hook_linear_inputs(model, record)
    for k, ids in enumerate(calib_ids):
        model.forward([model.new_cache(len(ids))], [list(ids)])
        if on_window is not None:
            on_window(k)
    return {slot: s.sqrt().cpu() for slot, s in sums.items()}


def wanda_prune(weight: torch.Tensor, norms: torch.Tensor, kept: int) -> torch.Tensor:
    """weight [N, K] with all but the `kept` highest |W_ij| * norms_j of each row set to zero."""
    n, k = weight.shape
    if norms.shape != (k,):
        raise ValueError(f"input norms of shape {tuple(norms.shape)} for a weight of {k} inputs")
    out = torch.zeros_like(weight)
    if kept:
        scale = norms.to(weight.device, torch.float32)[None, :]
        for a in range(0, n, PRUNE_ROWS):  # row blocks: the float32 scores and int64 indices of a block at a time
            w = weight[a : a + PRUNE_ROWS]
            idx = (w.float().abs() * scale).topk(kept, dim=1, sorted=False).indices
            out[a : a + PRUNE_ROWS].scatter_(1, idx, w.gather(1, idx))
    return out


def pruner(norms: Mapping, kept: Callable[[int], int]) -> Callable:
    """The convert step's pre-encoding hook: (module key, local name, tensor) -> the tensor Wanda-pruned
    (weights without recorded inputs are returned as they are: the format prunes them by magnitude)."""

    def prune(key, local: str, tensor: torch.Tensor) -> torch.Tensor:
        n = norms.get((key, local))
        if n is None or tensor.dim() != 2:
            return tensor
        return wanda_prune(tensor, n, kept(tensor.shape[1]))

    return prune
