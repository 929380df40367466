"""`offbatch train-predictors`: per FFN layer, a small low-rank MLP that predicts from the FFN's input which
neurons will be active (Deja Vu / PowerInfer), trained on calibration activations.

A predictor is x -> relu(x A^T + c) B^T, A [rank, hidden], c [rank], B [intermediate, rank]: a logit per neuron
(Deja Vu / PowerInfer have no c; trained on inputs with a strong common direction - the hidden states of the
synthetic OPT-30B, rows 0.4-0.8 cosine-similar - every hidden unit of a bias-free predictor died, recall 0 on
every layer, so training centres the inputs and c carries the centring);
a neuron is predicted active where its logit is above the layer's cut. Active means what `offbatch profile`
counted (tools/activity.py): not 0 for ReLU FFNs, |activation| above the FFN's threshold otherwise.
Training minimises binary cross-entropy with the active (rare) class weighted up by how rare it is. The
calibration tokens are split three ways: training, choosing the cut (the lowest logit that keeps the asked
recall there) and measuring (recall and predicted sparsity on tokens neither of the others saw).

Dense FFNs only: an MoE layer's experts already see only their routed tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offbatch.tools.model_hooks import hook_linear_inputs, read_tagged, write_tagged

PREDICTORS_FILE = "offbatch_predictors.safetensors"
SPLIT = (0.7, 0.15)  # training, choosing the cut; the rest measures


@torch.inference_mode()
def collect(model, windows: Sequence[Sequence[int]], thresholds: dict[str, float]) -> dict[str, tuple]:
    """For every dense FFN ("layers.L.down", as activity.stat_name names it): its inputs X [T, hidden] and
    which neurons were active Y [T, intermediate] (bool), over the windows, on the CPU."""
    from offbatch.tools.activity import stat_name

    xs: dict[str, list] = {}
    ys: dict[str, list] = {}

    def hook(key, name, x):
        if name == "up":
            xs.setdefault(stat_name(key, "down"), []).append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        elif name == "down":
            n = stat_name(key, name)
            t = thresholds.get(n, 0.0)
            ys.setdefault(n, []).append((x.detach().abs() > t).reshape(-1, x.shape[-1]).cpu())
        return x

    originals = hook_linear_inputs(model, hook)
    try:
        for ids in windows:
            model.forward([model.new_cache(len(ids))], [list(ids)])
    finally:
        model.modules.update(originals)
    order = sorted(ys, key=lambda n: (int(n.split(".")[1]), n))  # by layer
    return {n: (torch.cat(xs[n]), torch.cat(ys[n])) for n in order if n in xs}


@dataclass
class Predictor:
    a: torch.Tensor  # [rank, hidden]
    b: torch.Tensor  # [intermediate, rank]
    cut: float  # logit above which a neuron is predicted active
    metrics: dict = field(default_factory=dict)
    c: torch.Tensor | None = None  # [rank] hidden bias (None: none)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = x.float() @ self.a.T
        if self.c is not None:
            z = z + self.c
        return torch.relu(z) @ self.b.T

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted active neurons [T, intermediate] (bool) for FFN inputs x [T, hidden]."""
        return self.logits(x) > self.cut


def train_one(x: torch.Tensor, y: torch.Tensor, rank: int, recall: float, epochs: int = 30, lr: float = 3e-3,
              seed: int = 0, device=None) -> Predictor:
    """A predictor for one FFN from its inputs x [T, H] and activity y [T, I] (rows in token order), trained on
    `device` (default: x's); the predictor comes back on the CPU, float32."""
    device = torch.device(device) if device is not None else x.device
    x, y = x.float().to(device), y.to(device)
    g = torch.Generator().manual_seed(seed)
    t = x.shape[0]
    n_train, n_cut = int(t * SPLIT[0]), int(t * SPLIT[1])
    perm = torch.randperm(t, generator=g)
    tr, cu, te = perm[:n_train], perm[n_train : n_train + n_cut], perm[n_train + n_cut :]
    h, i = x.shape[1], y.shape[1]
    # Inputs are centred and scaled to unit RMS for training; both fold into A and c afterwards.
    mu = x[tr].mean(dim=0)
    scale = (x[tr] - mu).pow(2).mean().sqrt().clamp_min(1e-6)
    a = (torch.randn(rank, h, generator=g) / h**0.5).to(device).requires_grad_()
    c = torch.zeros(rank, device=device, requires_grad=True)
    b = (torch.randn(i, rank, generator=g) / rank**0.5).to(device).requires_grad_()
    p = float(y[tr].float().mean())
    pos_weight = torch.tensor(min(20.0, max(1.0, (1 - p) / max(p, 1e-6))))
    opt = torch.optim.Adam([a, c, b], lr=lr)
    batch = 256
    with torch.enable_grad():
        for _ in range(epochs):
            order = tr[torch.randperm(tr.numel(), generator=g)]
            for s in range(0, order.numel(), batch):
                idx = order[s : s + batch].to(device)
                logits = torch.relu((x[idx] - mu) / scale @ a.T + c) @ b.T
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx].float(), pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        from offbatch.errors import OffbatchError

        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise OffbatchError(f"predictor training diverged (non-finite weights; last loss {float(loss):.4g}; "
                            f"{bad} of {t} input rows not finite): try a lower learning rate")
    a_x = a.detach() / scale
    pred = Predictor(a_x, b.detach(), 0.0, c=c.detach() - mu @ a_x.T)
    cu, te = cu.to(device), te.to(device)
    with torch.no_grad():
        # The cut: the largest logit that still keeps `recall` of the active neurons on the cut split.
        lg = pred.logits(x[cu])
        pos = lg[y[cu]].float()
        if pos.numel() > (1 << 24):  # torch.quantile's limit: a fixed-stride sample of the positives
            pos = pos[:: pos.numel() // (1 << 24) + 1]
        pred.cut = float(torch.quantile(pos, 1 - recall)) if pos.numel() else 0.0
        pred.metrics = measure(pred, x[te], y[te])
    pred.a, pred.b, pred.c = pred.a.cpu(), pred.b.cpu(), pred.c.cpu()
    return pred


def measure(pred: Predictor, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Recall (active neurons predicted active), predicted sparsity and true sparsity over x, y."""
    with torch.no_grad():
        got = pred.active(x)
    pos = int(y.sum())
    return {"recall": float((got & y).sum()) / pos if pos else 1.0, "predicted_sparsity": 1.0 - float(got.float().mean()),
            "sparsity": 1.0 - float(y.float().mean()), "tokens": int(x.shape[0])}


def save_predictors(path: str | Path, predictors: dict[str, Predictor], about: dict) -> Path:
    tensors = {}
    for name, p in predictors.items():
        tensors[f"{name}.pred.a"] = p.a
        tensors[f"{name}.pred.b"] = p.b
        if p.c is not None:
            tensors[f"{name}.pred.c"] = p.c
        tensors[f"{name}.pred.cut"] = torch.tensor([p.cut], dtype=torch.float32)
    return write_tagged(path, tensors, "predictors", {"about": json.dumps(about), "metrics": json.dumps(
        {n: p.metrics for n, p in predictors.items()})})


def load_predictors(path: str | Path) -> dict[str, Predictor]:
    from offbatch.errors import InputFileError

    tensors, meta = read_tagged(path, "predictors", "a predictors file", "offbatch train-predictors")
    metrics = json.loads(meta.get("metrics", "{}"))
    names = sorted(k[: -len(".pred.a")] for k in tensors if k.endswith(".pred.a"))
    out = {}
    for n in names:
        if f"{n}.pred.b" not in tensors or f"{n}.pred.cut" not in tensors:
            raise InputFileError(f"{path} is incomplete: predictor {n} lacks a part")
        out[n] = Predictor(tensors[f"{n}.pred.a"], tensors[f"{n}.pred.b"], float(tensors[f"{n}.pred.cut"][0]),
                           metrics.get(n, {}), tensors.get(f"{n}.pred.c"))
    return out
