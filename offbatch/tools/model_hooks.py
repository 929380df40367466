"""What the calibration tools (prune.py: Wanda's input norms, activity.py: `profile`, predictor.py:
`train-predictors`) share: seeing, or changing, every linear layer's input as the reference forward runs, and
writing their tensors as one safetensors file tagged with what wrote it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from offbatch.formats.base import ModuleWeights


class LinearInputHook(ModuleWeights):
    """A module's weights that pass each linear layer's input through `hook(key, name, x)` (module key, the
    layer's local name: "q", "down", "experts.3.down") and compute with what it returns."""

    def __init__(self, inner: ModuleWeights, key, hook: Callable):
        super().__init__(inner.tensors, inner.format)
        self.key, self.hook = key, hook

    def linear(self, x, name):
        return super().linear(self.hook(self.key, name, x), name)


def hook_linear_inputs(model, hook: Callable) -> dict:
    """Put `hook` on every module of a ReferenceModel (its forward reads model.modules), in place of any
    earlier hook. -> the modules as they were (model.modules.update(them) takes the hook off)."""
    before = dict(model.modules)
    for key, mw in before.items():
        model.modules[key] = LinearInputHook(mw, key, hook)
    return before


def write_tagged(path: str | Path, tensors: dict[str, torch.Tensor], tag: str, meta: dict[str, str]) -> Path:
    """A safetensors file whose metadata names its kind (`tag`), written beside and renamed into place."""
    from safetensors.torch import save_file

    from offbatch.errors import OutputFileError

    path = Path(path)
    check_output(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"offbatch": tag, **meta})
        tmp.replace(path)
    except Exception as e:  # safetensors' own error type for a failed write, or an OSError
        tmp.unlink(missing_ok=True)
        raise OutputFileError(f"writing {path} failed: {e}") from None
    return path


def check_output(path: Path, overwrite: bool = True) -> None:
    """A file can be written at `path`: its folder exists, it is not a folder, and (unless overwrite) it is new."""
    from offbatch.errors import OutputFileError

    if path.is_dir():
        raise OutputFileError(f"{path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise OutputFileError(f"{path.parent} is not a folder: the file cannot be written there")
    if path.exists() and not overwrite:
        raise OutputFileError(f"{path} exists: give --overwrite to replace it")


def read_tagged(path: str | Path, tag: str, what: str, writer: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file write_tagged wrote with `tag`; anything else is one InputFileError
    naming `what` it should have been and the command (`writer`) that writes one."""
    from safetensors import safe_open

    from offbatch.errors import InputFileError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad file
        raise InputFileError(f"{path} is not {what} ({e})") from None
    if meta.get("offbatch") != tag:
        raise InputFileError(f"{path} is not {what} written by `{writer}`")
    return tensors, meta
