"""Quality of a model, measured: perplexity over fixed token windows of a text, and how often a model's
greedy token agrees with another's (a compressed format against the dense model) on the same windows.
A `Variant` is one thing scored: a weight format, a KV format and an HGCA setting (`variants` says which
eval-ppl scores for its --weights, --kv and --hgca).

A window is scored on its own (a fresh cache): token i is predicted from tokens 0..i-1 of the same window.
Windows overlap when stride < window; then a window scores only the tokens the previous one did not
(its last `stride`), each with `window - stride` tokens or more of context, so no token counts twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from offbatch.attention.hgca_setting import HGCASetting


@dataclass(frozen=True)
class Window:
    ids: tuple[int, ...]
    first: int  # index (in ids) of the first token scored; every token from there to the end is

    @property
    def scored(self) -> int:
        return len(self.ids) - self.first


def windows(ids: Sequence[int], window: int, stride: int | None = None,
            max_windows: int | None = None) -> list[Window]:
    """Windows of `window` tokens starting every `stride` tokens (default: window, no overlap) while a
    whole window fits; at most max_windows of them. Fewer than `window` ids give no window."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError("a window needs at least 2 tokens (one to predict from, one to predict)")
    if stride < 1:
        raise ValueError("the stride must be at least 1 token")
    if max_windows is not None and max_windows < 1:
        raise ValueError("max_windows must be at least 1")
    first_overlapped = max(window - stride, 1)  # a window after the first scores its new tokens only
    out = []
    for k, start in enumerate(range(0, len(ids) - window + 1, stride)):
        if max_windows is not None and k >= max_windows:
            break
        out.append(Window(tuple(ids[start : start + window]), 1 if k == 0 else first_overlapped))
    return out


@dataclass
class Scores:
    """One model over a list of windows: the summed negative log-likelihood (nats) of the scored tokens,
    their count, and the greedy token the model predicted for each of them (per window)."""

    nll_sum: float = 0.0
    tokens: int = 0
    greedy: list[torch.Tensor] = field(default_factory=list)

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


@torch.inference_mode()
def score(model, wins: Sequence[Window], on_window: Callable[[int], None] | None = None) -> Scores:
    """Run `model` (a ReferenceModel, or anything with new_cache and forward(caches, tokens, all_logits))
    over each window; on_window(k) is called after window k (progress)."""
    out = Scores()
    for k, w in enumerate(wins):
        logits = model.forward([model.new_cache(len(w.ids))], [list(w.ids)], all_logits=True)
        # The logits at position i predict token i + 1.
        pred = logits[w.first - 1 : len(w.ids) - 1].float()
        target = torch.tensor(w.ids[w.first :], dtype=torch.long, device=pred.device)
        out.nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
        out.tokens += w.scored
        out.greedy.append(pred.argmax(-1).cpu())
        if on_window is not None:
            on_window(k)
    return out


def agreement_of(a: Scores, b: Scores) -> float:
    """The share of scored positions where both models' greedy tokens are the same."""
    if len(a.greedy) != len(b.greedy) or any(x.shape != y.shape for x, y in zip(a.greedy, b.greedy)):
        raise ValueError("the two scores are not over the same windows")
    if not a.greedy:
        return float("nan")
    same = sum(int((x == y).sum()) for x, y in zip(a.greedy, b.greedy))
    return same / sum(x.numel() for x in a.greedy)


def perplexity(model, wins: Sequence[Window]) -> tuple[float, float, int]:
    """(perplexity, mean NLL per token in nats, tokens scored) of `model` over the windows."""
    s = score(model, wins)
    return s.perplexity, s.nll, s.tokens


def agreement(model_a, model_b, wins: Sequence[Window]) -> float:
    """Greedy-token agreement of two models over the same windows (1.0: always the same argmax)."""
    return agreement_of(score(model_a, wins), score(model_b, wins))


def delta_pct(base: Scores, s: Scores) -> float:
    """How much higher (%) s's perplexity is than base's (negative: lower)."""
    return 100.0 * (s.perplexity / base.perplexity - 1.0)


# ---- what eval-ppl scores ------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One scored configuration: weights in a weight format, K and V stored in a KV format, and full
    attention (hgca None) or HGCA with a setting."""

    weights: str
    kv: str = "dense"
    hgca: "HGCASetting | None" = None
    hot_fraction: float | None = None  # the hybrid FFN with this share of each layer's neurons hot (None: dense FFN)
    kv_balance: bool = False  # keys balanced by the model's calibrated scales before the KV format stores them

    @property
    def kv_words(self) -> str:
        return self.kv + (", balanced keys" if self.kv_balance else "")

    @property
    def attention_words(self) -> str:
        return "full" if self.hgca is None else self.hgca.words()

    @property
    def ffn_words(self) -> str:
        return "dense" if self.hot_fraction is None else f"hybrid, {100 * self.hot_fraction:g}% hot"

    def settings(self) -> dict:
        """For a JSON report: the weight and KV format names, the HGCA setting (or None), the FFN."""
        return {"weights": self.weights, "kv": self.kv, "hgca": None if self.hgca is None else self.hgca.as_dict(),
                "ffn": "dense" if self.hot_fraction is None else "hybrid", "hot_fraction": self.hot_fraction,
                "kv_balance": self.kv_balance}


def variants(base_weights: str, weights: Sequence[str] = (), kvs: Sequence[str] = (),
             hgcas: "Sequence[HGCASetting]" = (), hot_fractions: Sequence[float] = (),
             kv_balance: bool = False) -> list[Variant]:
    """What eval-ppl scores, in order: the base (the model as stored, dense KV, full attention); each KV
    format and each HGCA setting on their own with the base weights; when both are given, every KV
    format with every HGCA setting (the engine runs them together), base weights; then each weight
    format with dense KV and full attention. Names are canonical (kvs: registered KV format names);
    repeats, and variants equal to the base, are dropped. The base-weight variants come before the
    weight formats, so one model at a time is in memory. kv_balance: each compressed KV format also with
    balanced keys, right after it."""
    wanted = [Variant(base_weights)]
    for kv in kvs:
        wanted.append(Variant(base_weights, kv=kv))
        if kv_balance and kv != "dense":
            wanted.append(Variant(base_weights, kv=kv, kv_balance=True))
    wanted += [Variant(base_weights, hgca=h) for h in hgcas]
    if kvs and hgcas:
        wanted += [Variant(base_weights, kv=kv, hgca=h, kv_balance=b) for kv in kvs for h in hgcas
                   for b in ((False, True) if kv_balance and kv != "dense" else (False,))]
    wanted += [Variant(base_weights, hot_fraction=h) for h in hot_fractions]
    wanted += [Variant(w) for w in weights]
    return list(dict.fromkeys(wanted))


def hybrid_ffn_model(model, neurons, hot_fraction: float):
    """A ReferenceModel over `model`'s modules computing each dense FFN as the hybrid FFN does: a layer's
    hot_fraction most active neurons (the profile's) for every token, the others only where the layer's
    predictor marks them active (the oracle: where |activation| is above the profile's threshold) - the
    engine's products, masked here on the full activations (ffn/hybrid_mlp.py: the same sums)."""
    import torch

    from offbatch.engine.reference import ReferenceModel
    from offbatch.tools.model_hooks import hook_linear_inputs

    hot = {}
    for layer, a in neurons.activity.items():
        mask = torch.zeros(a.numel(), dtype=torch.bool)
        mask[neurons.hot_cold(layer, round(hot_fraction * a.numel()))[0]] = True
        hot[layer] = mask.to(model.device)
    inputs = {}

    def hook(key, name, x):
        if key[1] != "ffn" or key[0] not in hot:
            return x
        if name == "up":
            inputs[key[0]] = x
            return x
        if name != "down":
            return x
        layer = key[0]
        inp = inputs.pop(layer)
        if neurons.oracle:
            active = x.abs() > neurons.thresholds.get(layer, 0.0)
        else:
            active = neurons.predictors[layer].active(inp.to(torch.float32)).to(x.device)
        return torch.where(active | hot[layer], x, torch.zeros((), dtype=x.dtype, device=x.device))

    out = ReferenceModel(model.spec, dict(model.modules), model.device, model.dtype, attention=model.attention)
    hook_linear_inputs(out, hook)
    return out
