"""`offbatch profile`: how often each FFN neuron is active over calibration text (PowerInfer's hot/cold
statistics), and what treating the rarely active ones as zero costs.

A neuron's activation is its entry of the down projection's input: act(x W_up) for a plain FFN, act(x
W_gate) * (x W_up) for a gated one. ReLU-family FFNs are exactly sparse: a neuron is active where its
activation is not 0. Gated SiLU/GELU FFNs are not; as in CATS / TEAL (training-free), a neuron counts as
active where |activation| exceeds a per-layer threshold, the quantile of |activation| over the calibration
tokens at the target sparsity, and zeroing the others is lossy: `thresholded_quality` measures it.

The statistics are one safetensors file: for every FFN (and every expert's) down projection
"layers.L.NAME.activity" (float32 [intermediate]: the share of calibration tokens where the neuron was
active) and "layers.L.NAME.threshold" (float32 [1]), with the calibration's description in the metadata;
for every dense FFN also "layers.L.down.union" (float32 [len(UNION_TOKENS), UNION_BUCKETS + 1]: how many of its
neurons the tokens of a step need together, ffn/union.py; files written before it lack it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from offbatch.ffn.union import UNION_BUCKETS, UNION_ROWS, UNION_TOKENS, union_table
from offbatch.tools.model_hooks import hook_linear_inputs, read_tagged, write_tagged

STATS_FILE = "offbatch_activity.safetensors"
SAMPLE_PER_CALL = 1 << 16  # |activation| values kept per FFN call for the threshold's quantile
RELU_FAMILY = ("relu",)


def stat_name(key, name: str) -> str:
    """"layers.3.down", "layers.3.experts.5.down" (key: the module key (layer, module))."""
    return f"layers.{key[0]}.{name}"


def hooked(model, hook: Callable):
    """`hook(key, name, h)` on every down projection's input h (the neuron activations) of a ReferenceModel,
    computing with what it returns, in place of any earlier hook. -> the model."""

    def downs(key, name, x):
        return hook(key, name, x) if name == "down" or name.endswith(".down") else x

    hook_linear_inputs(model, downs)
    return model


@dataclass
class ActivityStats:
    activity: dict[str, torch.Tensor]  # stat name -> [intermediate] share of tokens active
    threshold: dict[str, float]
    tokens: int
    meta: dict = field(default_factory=dict)
    union: dict[str, torch.Tensor] = field(default_factory=dict)  # dense FFNs: ffn/union.py's table

    def sparsity(self) -> float:
        """The share of (token, neuron) activations below threshold, over every FFN."""
        total = sum(a.numel() for a in self.activity.values())
        return 1.0 - sum(float(a.sum()) for a in self.activity.values()) / max(1, total)

    def save(self, path: str | Path) -> Path:
        tensors = {}
        for name, a in self.activity.items():
            tensors[f"{name}.activity"] = a.float()
            tensors[f"{name}.threshold"] = torch.tensor([self.threshold[name]], dtype=torch.float32)
        for name, table in self.union.items():
            tensors[f"{name}.union"] = table.float()
        return write_tagged(path, tensors, "activity", {"tokens": str(self.tokens), "about": json.dumps(self.meta)})


def load_stats(path: str | Path) -> ActivityStats:
    """The statistics `profile` wrote; a file that is not one is a clear error."""
    from offbatch.errors import InputFileError

    tensors, meta = read_tagged(path, "activity", "an activity statistics file", "offbatch profile")
    names = sorted(k[: -len(".activity")] for k in tensors if k.endswith(".activity"))
    if any(f"{n}.threshold" not in tensors for n in names):
        raise InputFileError(f"{path} is incomplete: a neuron activity without its threshold")
    union = {n: tensors[f"{n}.union"] for n in names if f"{n}.union" in tensors}
    if any(t.shape != (len(UNION_TOKENS), UNION_BUCKETS + 1) for t in union.values()):
        raise InputFileError(f"{path}: a union table of another shape than this offbatch writes: profile again")
    return ActivityStats({n: tensors[f"{n}.activity"] for n in names},
                         {n: float(tensors[f"{n}.threshold"][0]) for n in names}, int(meta.get("tokens", 0)),
                         json.loads(meta.get("about", "{}")), union)


@torch.inference_mode()
def profile(model, windows: Sequence[Sequence[int]], sparsity: float,
            on_window: Callable[[str, int], None] | None = None) -> ActivityStats:
    """Activity of every FFN neuron of `model` (a ReferenceModel) over the token windows. ReLU FFNs: active
    where > 0 (`sparsity` unused). Others: a per-FFN threshold at the `sparsity` quantile of |activation|
    (first pass), then the counts (second pass). on_window(pass name, window index)."""
    # ReLU (plain or gated): an activation is exactly 0 where the neuron is off.
    relu = model.spec.activation in RELU_FAMILY
    gen = torch.Generator().manual_seed(0)
    samples: dict[str, list[torch.Tensor]] = {}

    def sample(key, name, h):
        flat = h.detach().abs().reshape(-1).float().cpu()
        if flat.numel() > SAMPLE_PER_CALL:
            flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_CALL,), generator=gen)]
        samples.setdefault(stat_name(key, name), []).append(flat)
        return h

    def run(tag: str):
        for k, ids in enumerate(windows):
            model.forward([model.new_cache(len(ids))], [list(ids)])
            if on_window is not None:
                on_window(tag, k)

    threshold: dict[str, float] = {}
    if not relu:
        hooked(model, sample)
        run("threshold")
        for name, parts in samples.items():
            threshold[name] = float(torch.quantile(torch.cat(parts), sparsity)) if sparsity > 0 else 0.0
    counts: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    tokens = sum(len(w) for w in windows)
    # A dense FFN sees every token once, in order: the same random tokens of each are kept (bit-packed) to
    # measure how many neurons tokens need together (ffn/union.py).
    keep = torch.zeros(tokens, dtype=torch.bool)
    keep[torch.randperm(tokens, generator=gen)[:UNION_ROWS]] = True
    kept: dict[str, list[np.ndarray]] = {}

    def count(key, name, h):
        n = stat_name(key, name)
        t = threshold.setdefault(n, 0.0)
        active = h.detach().abs() > t
        flat = active.reshape(-1, h.shape[-1])
        counts[n] = counts[n] + flat.sum(0).cpu() if n in counts else flat.sum(0).cpu()
        start = rows.get(n, 0)
        rows[n] = start + flat.shape[0]
        if name == "down" and rows[n] <= tokens:
            pick = keep[start: rows[n]]
            if pick.any():
                kept.setdefault(n, []).append(np.packbits(flat[pick.to(flat.device)].cpu().numpy(), axis=1))
        return h

    hooked(model, count)
    run("count")
    # Experts see only the tokens routed to them: each one's share is over its own rows.
    activity = {n: (c.double() / max(1, rows[n])).float() for n, c in counts.items()}
    union = {}
    for n, parts in kept.items():
        width = activity[n].numel()
        masks = torch.from_numpy(np.unpackbits(np.concatenate(parts), axis=1, count=width).astype(bool))
        union[n] = union_table(masks, activity[n])
    return ActivityStats(activity, threshold, tokens,
                         {"activation": model.spec.activation, "gated": model.spec.gated_ffn,
                          "rule": "relu: not 0" if relu else f"|activation| > the {sparsity:g} quantile per FFN",
                          "target_sparsity": None if relu else sparsity, "windows": len(windows),
                          "expert_rows": {n: r for n, r in rows.items() if ".experts." in n}}, union)


def thresholded(model, stats: ActivityStats):
    """`model` computing with every activation at or below its FFN's threshold set to zero (the sparse
    FFN an activity oracle would compute)."""

    def cut(key, name, h):
        t = stats.threshold.get(stat_name(key, name))
        if t is None:
            return h
        return torch.where(h.abs() > t, h, torch.zeros((), dtype=h.dtype, device=h.device))

    return hooked(model, cut)
