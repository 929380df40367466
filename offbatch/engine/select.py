"""The one place that picks the engine behind `offbatch run`: the command asks for a Generator and
never learns which one it got, so the streaming engine plugs in here without touching the command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offbatch.engine.api import Generator


@dataclass
class EngineOptions:
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # None: the checkpoint's
    gpu_memory: int | None = None  # bytes offbatch may reserve on the GPU; None: all free
    cpu_memory: int | None = None
    max_batch: int = 32  # sequences decoded together


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def make_generator(model_dir: str | Path, tokenizer, options: EngineOptions | None = None) -> Generator:
    """A Generator for the model folder. For now: the reference forward and generator loop on the
    CPU (the streaming engine will be chosen here when the device and plan call for it)."""
    from offbatch.engine.reference_generator import ReferenceGenerator
    from offbatch.models.reference import ReferenceModel

    options = options or EngineOptions()
    # The reference runs where it is told and on the CPU by default: it is the correctness path, not
    # the fast one, and it holds the whole model on one device.
    model = ReferenceModel.load(model_dir, device=options.device or "cpu", dtype=options.dtype)
    return ReferenceGenerator(model, tokenizer.eos_token_ids, max_batch=options.max_batch)
