"""Lazy, memory-mapped reading of a Hugging Face safetensors checkpoint, validated before any compute.

Nothing is read into RAM until a tensor is asked for, so a model larger than memory can be inspected
and streamed tensor by tensor. Every problem with the folder (missing shard, truncated or corrupt
file, missing/unexpected/mis-shaped tensor, unsupported dtype) is found by `open_checkpoint` and
reported with the tensor and file names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from offbatch.errors import ModelFolderError
from offbatch.models.names import IGNORABLE_SUFFIXES, TensorInfo, expected_tensors
from offbatch.models.spec import ModelSpec, load_spec

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # checkpoint name
    canonical: str
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header ourselves so truncation and corruption are named precisely."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFolderError(f"{path} is truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise ModelFolderError(f"{path} is corrupt or truncated: header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFolderError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    except OSError as e:
        raise ModelFolderError(f"{path} cannot be read: {e.strerror}") from None
    data_start = 8 + n
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{path} is corrupt: tensor {name!r} has no data_offsets") from None
        end = max(end, stop)
    if data_start + end > size:
        raise ModelFolderError(
            f"{path} is truncated: its header describes {data_start + end} bytes but the file has {size}"
        )
    return header, data_start


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelFolderError(f"{index} is not a valid safetensors index (no 'weight_map')") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (model_dir / name).is_file():
                holders = sorted(t for t, f in weight_map.items() if f == name)
                raise ModelFolderError(
                    f"shard {name} named in {index.name} is missing from {model_dir} "
                    f"(it should hold {len(holders)} tensors, e.g. {holders[0]})"
                )
        return [model_dir / f for f in files]
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        return [model_dir / p for p in others]
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(bins)}: convert PyTorch .bin checkpoints to safetensors first)" if bins else ""
    raise ModelFolderError(f"no safetensors weights in {model_dir}{hint}")


class Checkpoint:
    """A validated, lazily-read checkpoint. `get(canonical)` returns a CPU tensor backed by mmap."""

    def __init__(self, model_dir: Path, spec: ModelSpec, entries: dict[str, TensorEntry], tied: bool):
        self.model_dir = model_dir
        self.spec = spec
        self.entries = entries  # canonical name -> entry
        self.tied = tied  # lm_head shares the embedding's storage
        self._handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        from safetensors import safe_open

        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), framework="pt")
        return h

    def has(self, canonical: str) -> bool:
        return canonical in self.entries or (canonical == "lm_head" and self.tied)

    def entry(self, canonical: str) -> TensorEntry:
        if canonical == "lm_head" and self.tied:
            return self.entries["embed"]
        return self.entries[canonical]

    def get(self, canonical: str) -> torch.Tensor:
        e = self.entry(canonical)
        return self._handle(e.file).get_tensor(e.name)

    def nbytes(self, canonical: str) -> int:
        return self.entry(canonical).nbytes

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def num_params(self) -> int:
        total = 0
        for e in self.entries.values():
            n = 1
            for d in e.shape:
                n *= d
            total += n
        return total

    def dtype(self) -> torch.dtype:
        """The checkpoint's storage dtype (of the embedding, which every model has)."""
        return SAFETENSORS_DTYPES[self.entries["embed"].dtype]


def open_checkpoint(model_dir: str | Path, spec: ModelSpec | None = None) -> Checkpoint:
    model_dir = Path(model_dir)
    spec = spec or load_spec(model_dir)
    expected: dict[str, TensorInfo] = expected_tensors(spec)
    found: dict[str, TensorEntry] = {}
    unexpected: list[tuple[str, Path]] = []
    for path in weight_files(model_dir):
        header, data_start = read_safetensors_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            info = expected.get(name)
            if info is None:
                if not name.endswith(IGNORABLE_SUFFIXES):
                    unexpected.append((name, path))
                continue
            dtype = meta.get("dtype")
            if dtype not in SAFETENSORS_DTYPES:
                raise ModelFolderError(
                    f"tensor {name} in {path.name} has dtype {dtype}; supported: bfloat16, float16, float32"
                )
            shape = tuple(meta.get("shape", ()))
            if shape != info.shape:
                raise ModelFolderError(
                    f"tensor {name} in {path.name} has shape {list(shape)}, but config.json implies {list(info.shape)}"
                )
            begin, stop = meta["data_offsets"]
            n = DTYPE_BYTES[dtype]
            for d in shape:
                n *= d
            if stop - begin != n:
                raise ModelFolderError(f"tensor {name} in {path.name} is corrupt: {stop - begin} bytes for {n}")
            found[info.canonical] = TensorEntry(name, info.canonical, path, dtype, shape, data_start + begin, n)
    if unexpected:
        names = ", ".join(f"{n} ({p.name})" for n, p in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ModelFolderError(
            f"unexpected tensors for a {spec.family} model with this config.json: {names}{more}"
        )
    # Tied embeddings: lm_head is not stored and reads the embedding.
    tied = "lm_head" not in found and spec.tie_word_embeddings
    missing = [n for n, info in expected.items() if info.canonical not in found and not (tied and info.canonical == "lm_head")]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = ", ".join(p.name for p in weight_files(model_dir))
        raise ModelFolderError(f"missing tensors in {files}: {listed}")
    return Checkpoint(model_dir, spec, found, tied)
