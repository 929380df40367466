"""Balanced keys for compressed KV (`--kv-balance`): each key channel divided by a calibrated scale before the
KV store quantizes it, each query channel multiplied by the same scale, so q.k is unchanged.

Why: some models' keys have a few channels far larger than the rest (Qwen2.5's); a group-wise int4 format
then spends a group's range on them and rounds the other channels to nothing: int4 KV costs Qwen2.5-0.5B
+92% perplexity. Dividing each channel by its typical size makes the channels alike before quantization
(the idea SmoothQuant applies to activations). With every channel at its calibrated scale, q.k is exact in
real arithmetic: what the KV format rounds is what changes.

The scales: per layer and KV head, each channel's largest |k| over calibration text (after RoPE; a channel
rotated with another by RoPE shares that pair's larger value, so one scale covers the pair), divided by
their geometric mean (the product of a head's scales is 1: keys keep their overall size). `offbatch
calibrate-keys` writes them beside the model (KEY_SCALES_FILE). Lossy in effect (with a lossy KV format) and
model dependent - it helps keys with outlier channels and can hurt even ones (SmolLM2): `calibrate-keys` and
`eval-ppl --kv ... --kv-balance` print what it does to perplexity and greedy agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from offbatch.errors import InputFileError
from offbatch.models.spec import ModelSpec

KEY_SCALES_FILE = "offbatch_key_scales.safetensors"
TAG = "key-scales"


class KeyScales:
    """layer -> float32 [num_kv_heads, head_dim] scales."""

    def __init__(self, scales: dict[int, torch.Tensor], meta: dict | None = None):
        self.scales = scales
        self.meta = dict(meta or {})
        self._on: dict = {}  # (device, dtype) -> {layer: (query scale [nh, d], key scale [nkv, d])}

    def check(self, spec: ModelSpec, source: str = "") -> None:
        want = (spec.num_kv_heads, spec.head_dim)
        for i in range(spec.num_layers):
            s = self.scales.get(i)
            if s is None:
                raise InputFileError(f"the key scales{f' ({source})' if source else ''} lack layer {i}: calibrate this "
                                     "model's keys again (offbatch calibrate-keys)")
            if tuple(s.shape) != want:
                raise InputFileError(f"the key scales of layer {i} are {tuple(s.shape)}; this model's keys are {want} "
                                     "(KV heads x head size): were they made for another model?")
            if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
                raise InputFileError(f"the key scales of layer {i} hold a zero, negative or non-finite scale: "
                                     "calibrate again")

    def apply(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [T, nh, d] times the scales of its KV head, k [T, nkv, d] divided by them)."""
        key = (q.device, q.dtype)
        cached = self._on.get(key)
        if cached is None:
            cached = self._on[key] = {}
        pair = cached.get(layer)
        if pair is None:
            s = self.scales[layer].to(device=q.device, dtype=torch.float32)
            rep = q.shape[1] // s.shape[0]
            pair = cached[layer] = (s.repeat_interleave(rep, dim=0).to(q.dtype), (1.0 / s).to(k.dtype))
        return q * pair[0], k * pair[1]

    def save(self, path: str | Path) -> Path:
        import json

        from offbatch.tools.model_hooks import write_tagged

        return write_tagged(path, {f"layers.{i}.key_scale": s.float().contiguous() for i, s in sorted(self.scales.items())},
                            TAG, {"about": json.dumps(self.meta)})


def load_key_scales(path: str | Path) -> KeyScales:
    from offbatch.tools.model_hooks import read_tagged

    import json

    tensors, meta = read_tagged(path, TAG, "key scales", "offbatch calibrate-keys")
    try:
        about = json.loads(meta.get("about", "{}"))
    except json.JSONDecodeError:
        about = {}
    scales = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "layers" or parts[2] != "key_scale" or not parts[1].isdigit() or t.dim() != 2:
            raise InputFileError(f"{path}: unexpected tensor {name!r} in a key scales file")
        scales[int(parts[1])] = t.float()
    return KeyScales(scales, about)


def _scales_file(model_dir: str | Path) -> Path:
    path = Path(model_dir) / KEY_SCALES_FILE
    if not path.is_file():
        raise InputFileError(f"--kv-balance needs the model's key scales: {path} is missing (offbatch calibrate-keys "
                             f"{model_dir} TEXT writes it)")
    return path


def key_scales_for_folder(model_dir: str | Path, spec: ModelSpec | None = None) -> KeyScales:
    """The key scales `calibrate-keys` wrote beside the model, checked against it."""
    from offbatch.models.spec import load_spec

    path = _scales_file(model_dir)
    scales = load_key_scales(path)
    scales.check(spec or load_spec(model_dir), str(path))
    return scales


def key_scales_fingerprint(model_dir: str | Path) -> str:
    """A short digest of the scales file: results made with other scales are other results."""
    import hashlib

    return hashlib.sha256(_scales_file(model_dir).read_bytes()).hexdigest()[:12]


class KeyRecorder:
    """An attention for the reference forward (engine/reference.py CacheAttention's interface) that keeps each
    layer's largest |k| per KV head and channel and attends exactly."""

    def __init__(self, spec: ModelSpec):
        from offbatch.attention.lossy_reference import LossyCacheAttention

        self.spec = spec
        self.inner = LossyCacheAttention(spec, "dense")
        self.kmax: dict[int, torch.Tensor] = {}

    def attend(self, layer: int, q, k, v, step):
        m = k.detach().abs().amax(0).float().cpu()
        self.kmax[layer] = torch.maximum(self.kmax[layer], m) if layer in self.kmax else m
        return self.inner.attend(layer, q, k, v, step)


def scales_from_maxima(kmax: dict[int, torch.Tensor], head_dim: int, rope_pairs: bool) -> dict[int, torch.Tensor]:
    """Balancing scales from each channel's largest |k| (see the module's docstring)."""
    out = {}
    for i, m in kmax.items():
        m = m.clamp_min(1e-6)
        if rope_pairs:  # RoPE rotates channel c with c + d/2
            h = head_dim // 2
            p = torch.maximum(m[..., :h], m[..., h:])
            m = torch.cat([p, p], dim=-1)
        out[i] = m / m.log().mean(-1, keepdim=True).exp()
    return out


def calibrate(model, token_windows: Sequence[Sequence[int]], on_window=None) -> KeyScales:
    """Key scales of a ReferenceModel from calibration windows (token id lists)."""
    from offbatch.engine.reference import ReferenceModel

    rec = KeyRecorder(model.spec)
    recording = ReferenceModel(model.spec, model.modules, model.device, model.dtype, attention=rec)
    with torch.inference_mode():
        for n, ids in enumerate(token_windows):
            recording.forward([recording.new_cache(len(ids))], [list(ids)])
            if on_window is not None:
                on_window(n)
    spec = model.spec
    scales = scales_from_maxima(rec.kmax, spec.head_dim, spec.positions == "rope")
    return KeyScales(scales, {"windows": len(token_windows), "tokens": sum(len(w) for w in token_windows)})


__all__ = ["KEY_SCALES_FILE", "KeyScales", "calibrate", "key_scales_fingerprint", "key_scales_for_folder",
           "load_key_scales", "scales_from_maxima"]
