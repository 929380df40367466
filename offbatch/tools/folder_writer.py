"""Writing a model folder: its weights as safetensors shards, the whole folder installed atomically.

Both writers of model folders use it (`offbatch convert`, `offbatch import-gguf`):
- `write_weights` lays tensors out in shards of at most `max_shard_bytes` (one `model.safetensors`, or
  `model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, as Hugging Face writes them).
  The sizes are known before anything is made, so the shards are planned first and then made one at a
  time: only one shard's tensors are in memory, whatever the model's size. Tensors that are made
  together (a weight's stored tensors: values and scales) stay in one file.
- `atomic_folder` gives a hidden temp folder beside the target and renames it into place at the end, so a
  crash or Ctrl-C never leaves a half-written folder, and two writers of one folder cannot mix files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from offbatch.errors import OffbatchError, OutputFileError

DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorGroup:
    """Tensors made together and written into one file: their file names, their bytes, and how to make
    them (called once, when their shard is written)."""

    names: tuple[str, ...]
    nbytes: int
    make: Callable[[], dict[str, torch.Tensor]]


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def plan_shards(groups: Sequence[TensorGroup], max_bytes: int) -> list[list[TensorGroup]]:
    """Groups in order, a new shard whenever the next group would take this one over max_bytes (a
    group larger than max_bytes gets a shard of its own)."""
    shards: list[list[TensorGroup]] = [[]]
    size = 0
    for g in groups:
        if shards[-1] and size + g.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_weights(folder: Path, groups: Sequence[TensorGroup], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                  progress: Callable[[int, int], None] | None = None) -> int:
    """Make and write every group's tensors into `folder`; progress(groups done, groups). -> bytes written."""
    from safetensors.torch import save_file

    shards = plan_shards(groups, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = done = 0
    for k, shard in enumerate(shards):
        fname = shard_name(k, len(shards))
        tensors: dict[str, torch.Tensor] = {}
        for g in shard:
            made = g.make()
            if sorted(made) != sorted(g.names):  # a bug in the caller: the index would lie about the files
                raise RuntimeError(f"made tensors {sorted(made)}, planned {sorted(g.names)}")
            for name, t in made.items():
                tensors[name] = t.contiguous()
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            done += 1
            if progress is not None:
                progress(done, len(groups))
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total


# ---- the folder, atomically ----------------------------------------------------------------------

def check_target(out_dir: Path, replace: bool, flag: str, error: type[OffbatchError] = OutputFileError) -> None:
    """Refuse an existing `out_dir` (anything but an empty folder) unless `replace` (the option `flag`)."""
    if os.path.lexists(out_dir) and not replace and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise error(f"{out_dir} already exists and is not empty (use {flag} to replace it)")


def install_folder(tmp: Path, out_dir: Path, replace: bool, error: type[OffbatchError] = OutputFileError) -> None:
    """Rename a finished temp folder to `out_dir`; with `replace`, swap out what is there."""
    old = None
    try:
        if replace and os.path.lexists(out_dir):
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)  # atomic; fails if a non-empty out_dir appeared meanwhile
        except OSError:
            if old is not None and not os.path.lexists(out_dir):
                os.rename(old, out_dir)  # put the previous folder back rather than leave none
                old = None
            raise
    except OSError as e:
        raise error(f"cannot create {out_dir}: {e.strerror or e}") from None
    finally:
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    old.unlink()


@contextlib.contextmanager
def atomic_folder(out_dir: Path, replace: bool, error: type[OffbatchError] = OutputFileError) -> Iterator[Path]:
    """A fresh hidden folder beside `out_dir` to write into; renamed to `out_dir` when the block ends
    normally, removed when it raises (any exception, KeyboardInterrupt included). An OSError inside
    (disk full, permissions) becomes one `error` naming out_dir."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise error(f"cannot create a folder next to {out_dir}: {e.strerror or e}") from None
    try:
        yield tmp
        install_folder(tmp, out_dir, replace, error)
    except OSError as e:
        raise error(f"writing {out_dir} failed: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
