"""Lazy, memory-mapped reading of a Hugging Face safetensors checkpoint, validated before any compute.

Nothing is read into RAM until a tensor is asked for, so a model larger than memory can be inspected
and streamed tensor by tensor. Every problem with the folder (missing shard, truncated or corrupt
file, missing/unexpected/mis-shaped tensor, unsupported dtype) is found by `open_checkpoint` and
reported with the tensor and file names.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from offbatch.errors import ModelFolderError
from offbatch.models.files import exists, file_in_folder, json_type, open_regular, parse_json, read_json_object
from offbatch.formats import DENSE, WeightFormat
from offbatch.models.converted import folder_format, stored_tensors
from offbatch.models.names import IGNORABLE_SUFFIXES
from offbatch.models.spec import ModelSpec, load_spec, read_config

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# The dtypes a weight format's stored tensors may have (values, scales, bitmaps).
STORED_DTYPES = {**SAFETENSORS_DTYPES, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # checkpoint name
    canonical: str
    file: Path
    dtype: str  # safetensors dtype string ("stored" for a tensor held as a format's stored tensors)
    shape: tuple[int, ...]  # the logical tensor's shape
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int
    stored: tuple[tuple[str, "TensorEntry"], ...] = ()  # (suffix, its entry) in a folder in a format


# Every dtype the safetensors format has, with its bytes per element: a file's layout is checked for
# all its tensors, including those offbatch does not read (rotary caches and the like).
SAFETENSORS_ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_TENSOR_DIMS = 16
INDEX_FILE = "model.safetensors.index.json"


def _corrupt(path: Path, why: str) -> ModelFolderError:
    return ModelFolderError(f"{path} is corrupt: {why}")


def _header_json(path: Path, f, size: int) -> tuple[dict, int]:
    """The raw header object and where the data starts, from an open file of `size` bytes."""
    head = f.read(8)
    if len(head) < 8:
        raise ModelFolderError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _corrupt(path, f"its header length {n:,} is over the {MAX_HEADER_BYTES:,}-byte limit "
                             "(not a safetensors file?)")
    if n > size - 8:
        raise ModelFolderError(f"{path} is corrupt or truncated: header length {n:,} exceeds the file ({size:,} bytes)")
    raw = f.read(n)
    if len(raw) < n:
        raise ModelFolderError(f"{path} is truncated: its header is cut short")
    if not raw.startswith(b"{"):
        raise _corrupt(path, "its safetensors header is not a JSON object")
    try:
        header = parse_json(raw, "header", unique_keys=True)
    except ModelFolderError as e:  # "header is not valid JSON: ..."
        raise _corrupt(path, f"its safetensors {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its safetensors header is not a JSON object")
    return header, 8 + n


def _check_entry(path: Path, name: str, meta) -> tuple[int, int]:
    """One tensor's header entry: its dtype, shape and data offsets agree with each other. -> offsets."""
    if not isinstance(meta, dict):
        raise _corrupt(path, f"tensor {name!r} has {json_type(meta)} where its description belongs")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_ITEM_BYTES:
        raise _corrupt(path, f"tensor {name!r} has the dtype {json.dumps(dtype)[:40]}, "
                             "which is not a safetensors dtype")
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has the shape {json.dumps(shape)[:80]}, "
                             "not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _corrupt(path, f"tensor {name!r} has the data_offsets {json.dumps(offsets)[:80]}, "
                             "not a list of two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _corrupt(path, f"tensor {name!r} has the data_offsets [{begin}, {end}]")
    nbytes = math.prod(shape) * SAFETENSORS_ITEM_BYTES[dtype]
    if end - begin != nbytes:
        raise _corrupt(path, f"tensor {name!r} of shape {shape} and dtype {dtype} takes {nbytes:,} bytes, "
                             f"but its data_offsets give it {end - begin:,}")
    return begin, end


def _check_layout(path: Path, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors' data tile the data section exactly: no overlap, no gap, nothing before or after
    (what the safetensors library insists on when the file is read)."""
    at = 0
    for begin, end, name in sorted(spans):
        if begin < at:
            raise _corrupt(path, f"the data of tensor {name!r} overlaps the tensor before it")
        if begin > at:
            raise _corrupt(path, f"{begin - at:,} bytes before tensor {name!r} belong to no tensor")
        at = end
    if at > data_bytes:
        raise ModelFolderError(f"{path} is truncated: its header describes {at:,} bytes of data "
                               f"but the file holds {data_bytes:,}")
    if at < data_bytes:
        raise _corrupt(path, f"{data_bytes - at:,} bytes after its last tensor belong to no tensor")


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header ourselves, so truncation and corruption are named precisely, and check
    every entry and the layout of the data: a header that passes can be read by the safetensors library.
    -> (header: tensor name -> {dtype, shape, data_offsets}, without __metadata__; data start)."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            header, data_start = _header_json(path, f, size)
        except OSError as e:
            raise ModelFolderError(f"{path} cannot be read: {e.strerror or e}") from None
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _corrupt(path, "its __metadata__ is not an object of strings")
    spans = [(*_check_entry(path, name, entry), name) for name, entry in header.items()]
    _check_layout(path, spans, size - data_start)
    return header, data_start


def _read_index(model_dir: Path) -> dict[str, str]:
    """The shard index's weight_map (tensor -> file), each file checked to lie in the folder."""
    index = model_dir / INDEX_FILE
    where = index.name
    obj = read_json_object(index, unique_keys=True)
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelFolderError(f"{index} is not a valid safetensors index: 'weight_map' must be an object of "
                               f"tensor name -> file name, not {json_type(weight_map)}")
    checked: set[str] = set()
    for file in weight_map.values():
        if file not in checked:  # (file_in_folder refuses a non-string before it is hashed)
            file_in_folder(model_dir, file, where)
            checked.add(file)
    return weight_map


def index_map(model_dir: Path) -> dict[str, str] | None:
    """The shard index's tensor -> file map, or None for a folder without an index."""
    model_dir = Path(model_dir)
    return _read_index(model_dir) if exists(model_dir / INDEX_FILE) else None


def weight_files(model_dir: Path, weight_map: dict[str, str] | None = None) -> list[Path]:
    """The folder's safetensors files: the shards its index names (`weight_map`, read here when not
    given), else model.safetensors, else every *.safetensors file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    single = model_dir / "model.safetensors"
    if exists(index):
        weight_map = weight_map if weight_map is not None else _read_index(model_dir)
        files = sorted(set(weight_map.values()))
        if not files:
            raise ModelFolderError(f"{index} names no shard files (its weight_map is empty)")
        for name in files:
            if not exists(model_dir / name):
                holders = sorted(t for t, f in weight_map.items() if f == name)
                raise ModelFolderError(
                    f"shard {name} named in {index.name} is missing from {model_dir} "
                    f"(it should hold {len(holders)} tensors, e.g. {holders[0]})"
                )
        return [model_dir / f for f in files]
    if exists(single):
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        return [model_dir / p for p in others]
    bins = sorted(p.name for p in model_dir.glob("*.bin"))
    hint = f" (found {', '.join(bins)}: convert PyTorch .bin checkpoints to safetensors first)" if bins else ""
    raise ModelFolderError(f"no safetensors weights in {model_dir}{hint}")


class Checkpoint:
    """A validated, lazily-read checkpoint. `get(canonical)` returns a CPU tensor backed by mmap."""

    def __init__(self, model_dir: Path, spec: ModelSpec, entries: dict[str, TensorEntry], tied: bool,
                 fmt: WeightFormat = DENSE):
        self.model_dir = model_dir
        self.spec = spec
        self.entries = entries  # canonical name -> entry
        self.tied = tied  # lm_head shares the embedding's storage
        self.format = fmt  # the format the folder's weights are stored in (models/converted.py)
        self._handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        from safetensors import SafetensorError, safe_open

        h = self._handles.get(path)
        if h is None:
            try:
                h = self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:  # changed on disk since open_checkpoint checked it
                raise ModelFolderError(f"{path} cannot be read: {e}") from None
        return h

    def has(self, canonical: str) -> bool:
        return canonical in self.entries or (canonical == "lm_head" and self.tied)

    def entry(self, canonical: str) -> TensorEntry:
        if canonical == "lm_head" and self.tied:
            return self.entries["embed"]
        return self.entries[canonical]

    def get(self, canonical: str) -> torch.Tensor:
        """The logical tensor; one stored in a format is decoded (float32) by the format's twin."""
        e = self.entry(canonical)
        if e.stored:
            local = "w"  # any name: the format decodes the stored tensors it is handed
            stored = {local + suffix: t for suffix, t in self.get_stored(canonical).items()}
            return self.format.dequantize(stored, local, torch.float32, e.shape[-1])
        return self._handle(e.file).get_tensor(e.name)

    def get_stored(self, canonical: str) -> dict[str, torch.Tensor]:
        """A tensor held in the folder's format: its stored tensors by suffix (".q4", ".scale", ...)."""
        return {suffix: self._handle(s.file).get_tensor(s.name) for suffix, s in self.entry(canonical).stored}

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
    """Every weight file's header and layout checked against config.json (and the shard index), before
    any tensor is read: a folder that opens here is one `run` can read. A folder in a weight format
    (config.json's quantization_config, models/converted.py) holds each compressed tensor as the
    format's stored tensors, each checked for its exact shape and dtype."""
    model_dir = Path(model_dir)
    spec = spec or load_spec(model_dir)
    fmt = folder_format(read_config(model_dir))
    expected = stored_tensors(spec, fmt)
    indexed = index_map(model_dir)
    found: dict[str, TensorEntry] = {}
    parts: dict[str, list[tuple[str, TensorEntry]]] = {}
    seen_in: dict[str, Path] = {}  # every tensor name of every file -> its file
    unexpected: list[tuple[str, Path]] = []
    files = weight_files(model_dir, indexed)
    headers = [(path, *read_safetensors_header(path)) for path in files]
    for path, header, _ in headers:
        for name in header:
            if name in seen_in:
                raise ModelFolderError(f"tensor {name} is in two weight files, {seen_in[name].name} and {path.name}; "
                                       "a tensor must be stored once")
            seen_in[name] = path
    for name, path in seen_in.items():
        if indexed is not None and name in indexed and Path(indexed[name]) != path.relative_to(model_dir):
            raise ModelFolderError(f"tensor {name} is in {path.name}, but {INDEX_FILE} says it is in {indexed[name]}")
    for path, header, data_start in headers:
        for name, meta in header.items():
            info = expected.get(name)
            if info is None:
                if not name.endswith(IGNORABLE_SUFFIXES):
                    unexpected.append((name, path))
                continue
            dtype, shape = meta["dtype"], tuple(meta["shape"])
            if info.dtype is None and dtype not in SAFETENSORS_DTYPES:
                raise ModelFolderError(
                    f"tensor {name} in {path.name} has dtype {dtype}; supported: bfloat16, float16, float32"
                )
            if info.dtype is not None and STORED_DTYPES.get(dtype) != info.dtype:
                raise ModelFolderError(f"tensor {name} in {path.name} has dtype {dtype}, but the {fmt.name} "
                                       f"format stores it as {str(info.dtype).replace('torch.', '')}")
            if shape != info.shape:
                implied = "config.json implies" if info.dtype is None else f"config.json and the {fmt.name} format imply"
                raise ModelFolderError(
                    f"tensor {name} in {path.name} has shape {list(shape)}, but {implied} {list(info.shape)}"
                )
            begin, stop = meta["data_offsets"]
            entry = TensorEntry(name, info.canonical, path, dtype, shape, data_start + begin, stop - begin)
            if info.dtype is None:
                found[info.canonical] = entry
            else:
                parts.setdefault(info.canonical, []).append((info.suffix, entry))
    if unexpected:
        names = ", ".join(f"{n} ({p.name})" for n, p in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        hint = ("" if fmt is DENSE else f" stored in the {fmt.name} format")
        raise ModelFolderError(
            f"unexpected tensors for a {spec.family} model with this config.json{hint}: {names}{more}"
        )
    _add_stored(found, parts, expected)
    # Tied embeddings: lm_head is not stored and reads the embedding.
    tied = "lm_head" not in found and spec.tie_word_embeddings
    missing = [n for n, info in expected.items() if n not in seen_in and not (tied and info.canonical == "lm_head")]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        names = ", ".join(p.name for p in files)
        raise ModelFolderError(f"missing tensors in {names}: {listed}")
    return Checkpoint(model_dir, spec, found, tied, fmt)


def _add_stored(found: dict[str, TensorEntry], parts: dict[str, list[tuple[str, TensorEntry]]], expected) -> None:
    """One logical entry for each tensor held as a format's stored tensors (all of them: the caller
    reports missing ones)."""
    shapes = {info.canonical: info.logical for info in expected.values()}
    for canonical, got in parts.items():
        got = sorted(got)
        first = got[0][1]
        found[canonical] = TensorEntry(first.name.removesuffix(got[0][0]), canonical, first.file, "stored",
                                       shapes[canonical], first.offset, sum(e.nbytes for _, e in got), tuple(got))


def check_format(ckpt: Checkpoint, fmt: WeightFormat) -> None:
    """A folder stored in a format runs in it, or expanded (dense); quantizing its already quantized
    weights again into another format would stack two roundings, so that is refused."""
    if ckpt.format is not DENSE and fmt.name not in (ckpt.format.name, DENSE.name):
        raise ModelFolderError(f"{ckpt.model_dir} is stored in the {ckpt.format.name} weight format: run it in "
                               f"that format (the default) or as dense, not as {fmt.name} (convert the "
                               "unquantized model to that format instead)")


def check_finite(ckpt: Checkpoint, canonical: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor the caller has just read, refused if it holds NaN or infinity (a corrupt or badly
    converted checkpoint, which would otherwise give empty 'ok' texts). One pass over memory the
    caller already holds; callers that stream weights do not pay it."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        e = ckpt.entry(canonical)
        raise ModelFolderError(f"tensor {e.name} in {e.file.name} holds NaN or infinite values; "
                               "the checkpoint is corrupt")
    return tensor
