"""What the hybrid FFN knows of a model's neurons: how often each is active (`offbatch profile`'s
statistics) and a predictor per layer (`offbatch train-predictors`), keyed by layer.

The planner reads the activity to price a split (how many cold neurons a step of T tokens needs, with the
predictor's over-prediction counted); the hybrid FFN backend reads both to place neurons and to predict.
An oracle in place of the predictors computes the exact activity (tests, and the quality of placement
alone): exact on ReLU FFNs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from offbatch.errors import InputFileError

ORACLE = "oracle"


@dataclass
class NeuronStats:
    activity: dict[int, torch.Tensor]  # layer -> [intermediate] float32: the share of tokens a neuron was active
    predictors: dict[int, object] = field(default_factory=dict)  # layer -> tools.predictor.Predictor
    oracle: bool = False  # exact activity instead of predictors
    source: str = ""
    # layer -> |activation| above which a neuron counts as active (the profile's; 0 for ReLU FFNs)
    thresholds: dict[int, float] = field(default_factory=dict)
    # layer -> the measured union of T tokens' active neurons by activity rank (ffn/union.py); may be empty
    union: dict[int, torch.Tensor] = field(default_factory=dict)

    def hot_cold(self, layer: int, hot_count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hot, cold) neuron indices of a layer, each ascending: the hot_count most often active, the rest."""
        a = self.activity[layer]
        hot_count = max(0, min(hot_count, a.numel()))
        order = a.argsort(descending=True, stable=True)
        return order[:hot_count].sort().values, order[hot_count:].sort().values

    def inflation(self) -> float:
        """Predicted-active over truly-active neurons (predictors keep a recall by predicting more): what the
        cold part computes beyond what it needs. 1 for the oracle."""
        if self.oracle or not self.predictors:
            return 1.0
        ratios = []
        for p in self.predictors.values():
            m = getattr(p, "metrics", {}) or {}
            if m.get("sparsity") is not None and m.get("predicted_sparsity") is not None and m["sparsity"] < 1:
                ratios.append((1 - m["predicted_sparsity"]) / (1 - m["sparsity"]))
        return max(1.0, sum(ratios) / len(ratios)) if ratios else 1.0

    def recall(self) -> float | None:
        """The predictors' mean recall on their held-out calibration tokens (1 for the oracle)."""
        if self.oracle:
            return 1.0
        got = [p.metrics["recall"] for p in self.predictors.values() if (getattr(p, "metrics", None) or {}).get("recall") is not None]
        return sum(got) / len(got) if got else None

    def check(self, spec) -> None:
        """Every dense FFN layer has statistics of its width (and a predictor, unless oracle)."""
        dense = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i)]
        missing = [i for i in dense if i not in self.activity]
        if missing:
            raise InputFileError(f"the activity statistics ({self.source or 'given'}) lack FFN layer {missing[0]}: "
                                 "profile this model again (offbatch profile)")
        wrong = [i for i in dense if self.activity[i].numel() != spec.intermediate_size]
        if wrong:
            raise InputFileError(f"the activity statistics of layer {wrong[0]} have {self.activity[wrong[0]].numel()} "
                                 f"neurons; this model's FFN has {spec.intermediate_size}: were they made for another model?")
        if not self.oracle:
            lacking = [i for i in dense if i not in self.predictors]
            if lacking:
                raise InputFileError(f"no activity predictor for FFN layer {lacking[0]}: train them for this model "
                                     "(offbatch train-predictors)")
            bad = [i for i in dense if self.predictors[i].b.shape[0] != spec.intermediate_size
                   or self.predictors[i].a.shape[1] != spec.hidden_size]
            if bad:
                raise InputFileError(f"the predictor of layer {bad[0]} does not fit this model's FFN "
                                     f"({spec.hidden_size} -> {spec.intermediate_size}): were they trained for another model?")


def _layer_of(name: str) -> int | None:
    """"layers.3.down" -> 3; an expert's statistics ("layers.3.experts.5.down") -> None."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[2] == "down" and parts[1].isdigit():
        return int(parts[1])
    return None


def load_neuron_stats(activity_file: str | Path, predictors_file: str | Path | None) -> NeuronStats:
    """From `offbatch profile`'s file and `offbatch train-predictors`' file (None: the oracle)."""
    from offbatch.tools.activity import load_stats
    from offbatch.tools.predictor import load_predictors

    stats = load_stats(activity_file)
    activity = {layer: a.float() for n, a in stats.activity.items() if (layer := _layer_of(n)) is not None}
    preds = {}
    if predictors_file is not None:
        preds = {layer: p for n, p in load_predictors(predictors_file).items() if (layer := _layer_of(n)) is not None}
    thresholds = {layer: float(t) for n, t in stats.threshold.items() if (layer := _layer_of(n)) is not None}
    union = {layer: t.float() for n, t in stats.union.items() if (layer := _layer_of(n)) is not None}
    return NeuronStats(activity, preds, oracle=predictors_file is None,
                       source=f"{activity_file}" + (f" + {predictors_file}" if predictors_file else " + oracle"),
                       thresholds=thresholds, union=union)


def neuron_files(model_dir: str | Path, predictors: str | None = None) -> tuple[Path, Path | None]:
    """(the activity statistics, the predictors file or None for the oracle) a hybrid run over this folder
    reads, each checked to exist: the ones saved beside the model (offbatch_activity.safetensors,
    offbatch_predictors.safetensors), or predictors: "oracle" or a predictors file."""
    from offbatch.tools.activity import STATS_FILE
    from offbatch.tools.predictor import PREDICTORS_FILE

    model_dir = Path(model_dir)
    act = model_dir / STATS_FILE
    if not act.is_file():
        raise InputFileError(f"--ffn hybrid needs the model's activity statistics, {act}: write them with "
                             f"`offbatch profile {model_dir} TEXT -o {act}`")
    if predictors == ORACLE:
        return act, None
    if predictors is not None and not predictors.strip():
        raise InputFileError("--predictors is empty: give a predictors file (offbatch train-predictors) or 'oracle'")
    pred = Path(predictors) if predictors is not None else model_dir / PREDICTORS_FILE
    if not pred.is_file():
        raise InputFileError(f"--ffn hybrid needs activity predictors, {pred}: train them with "
                             f"`offbatch train-predictors {model_dir} TEXT -o {pred}` (or --predictors oracle)")
    return act, pred


def neuron_stats_for_folder(model_dir: str | Path, predictors: str | None = None) -> NeuronStats:
    """The statistics and predictors a hybrid run over this folder uses (neuron_files)."""
    return load_neuron_stats(*neuron_files(model_dir, predictors))


def neuron_fingerprint(model_dir: str | Path, predictors: str | None = None) -> str:
    """A short digest of the statistics and predictors files' contents: results made with other (retrained)
    predictors are other results, whatever the files' names."""
    import hashlib

    h = hashlib.sha256()
    for path in neuron_files(model_dir, predictors):
        if path is None:
            h.update(b"oracle")
            continue
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]
