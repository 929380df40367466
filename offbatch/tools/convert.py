"""`offbatch convert`: write a dense model folder's weights in a weight format, as a folder that every
command reads like any other (offbatch/models/converted.py is the contract), and measure what it cost.

- The folder: config.json with `quantization_config` naming the format, the tokenizer and generation
  files copied, and the weight files holding exactly `stored_tensors(spec, fmt)`: each tensor the format
  compresses as `fmt.encode` stores it (the bytes the engine will stream), the others dense in the
  source's compute dtype (its embedding's). Sharded and written atomically by tools/folder_writer.py:
  one shard in memory at a time, nothing at OUT_DIR until the whole folder is there.
- The size: bytes before and after, per module kind.
- The quality (`measure_quality`): perplexity of the source and of the converted folder over windows of
  a real text, and how often their greedy tokens agree (tools/quality.py), each model run by the reference
  forward from its own folder; written to OUT_DIR/offbatch_quality.json.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from offbatch.errors import ModelFolderError, OffbatchError, OutputFileError
from offbatch.formats import DENSE, WeightFormat, format_names, get_format, known_format
from offbatch.models.catalogue import module_kind, module_of
from offbatch.models.converted import StoredTensor, quantization_config, stored_tensors
from offbatch.models.files import exists, open_regular
from offbatch.models.names import expected_tensors
from offbatch.tools.folder_writer import (DEFAULT_MAX_SHARD_BYTES, TensorGroup, atomic_folder, check_target,
                                          tensor_bytes, write_weights)

REPORT_FILE = "offbatch_quality.json"
# Files of a model folder besides config.json and the weights that a converted folder needs as they are.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")
# The formats whose group is a parameter of their name: --group 32 turns "int4" into "int4-g32".
GROUPED_FORMATS = ("int4", "int4-asym", "int8")
EVAL_WINDOW = 512  # tokens per window (as eval-ppl's default and BENCHMARKS.md's figures)
DEFAULT_EVAL_WINDOWS = 4  # 2,044 tokens scored: minutes for both models of a 135M model on a 2-core CPU


class FormatOptionError(ValueError):
    """A --weights / --group pair that names no format; `option` is the one to blame."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


# --skip names that every format keeps dense already (the embedding, the output head, the router).
ALWAYS_DENSE = ("embed", "head", "router")


def format_name(weights: str, group: int | None = None, skip: list[str] | None = None) -> str:
    """The format `--weights W [--group N] [--skip a,b]` names; FormatOptionError (with the reason) for a bad
    combination. --skip keeps those layers dense (formats/keep.py); embed, head and router are dense anyway."""
    name = _grouped_name(weights, group)
    keep = sorted({n.strip() for s in skip or () for n in s.split(",") if n.strip()} - set(ALWAYS_DENSE))
    if not keep:
        return name
    from offbatch.formats.keep import NAMES, keep_name

    unknown = [n for n in keep if n not in NAMES]
    if unknown:
        raise FormatOptionError("--skip", f"{', '.join(unknown)}: --skip takes {', '.join((*NAMES, *ALWAYS_DENSE))}")
    return keep_name(name, keep)


def _grouped_name(weights: str, group: int | None) -> str:
    if group is not None:
        if weights not in GROUPED_FORMATS:
            named = re.fullmatch(r"(int4(-asym)?|int8)-g\d+", weights) is not None
            raise FormatOptionError("--group", f"{weights!r} " + ("names its group already" if named else
                                    f"takes no group (only {', '.join(GROUPED_FORMATS)} do)"))
        grouped = f"{weights}-g{group}"
        if not known_format(grouped):
            if weights.startswith("int4") and get_format(weights).group == group:
                return weights  # the default group: one name per format ("int4-g64" is "int4")
            raise FormatOptionError("--group", f"{group} inputs is not a group: a group is 32 to 1024 inputs, "
                                    "a multiple of 32")
        weights = grouped
    if not known_format(weights):
        raise FormatOptionError("--weights", f"{weights!r} is not a weight format (known: {format_names()})")
    if get_format(weights) is DENSE:
        raise FormatOptionError("--weights", "'dense' stores the weights as they are: there is nothing to convert "
                                "(copy the folder)")
    return weights


# ---- the source ----------------------------------------------------------------------------------

def check_source(model_dir: Path) -> dict:
    """The source folder's config.json, refused when the folder is quantized already (or not a folder)."""
    from offbatch.models.spec import read_config

    config = read_config(model_dir)
    qc = config.get("quantization_config")
    if qc is not None:
        what = (f"already converted to {qc.get('format')!r} by offbatch" if isinstance(qc, dict)
                and qc.get("quant_method") == "offbatch" else
                f"already quantized ({qc.get('quant_method')!r})" if isinstance(qc, dict) else "already quantized")
        raise ModelFolderError(f"{model_dir} is {what} (config.json has a quantization_config): convert reads an "
                               "unquantized model folder; give the folder it was made from")
    return config


def check_paths(model_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """OUT_DIR is new (or --overwrite), and neither folder holds the other (replacing one would lose the source)."""
    src, out = model_dir.resolve(), out_dir.resolve()
    if src == out or src.is_relative_to(out):
        raise OutputFileError(f"{out_dir} is (or holds) the source folder {model_dir}: write the converted "
                              "folder somewhere else")
    check_target(out_dir, overwrite, "--overwrite")


# ---- the conversion ------------------------------------------------------------------------------

@dataclass
class ConvertSummary:
    out_dir: Path
    format: str
    tensors: int  # checkpoint tensors written
    compressed: int  # of them, those stored in the format's own tensors
    source_bytes: int
    bytes: int
    seconds: float
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # module kind -> [bytes before, after]

    @property
    def ratio(self) -> float:
        return self.source_bytes / self.bytes if self.bytes else float("nan")


def _stored_by_name(spec, fmt: WeightFormat) -> dict[str, list[tuple[str, StoredTensor]]]:
    """Checkpoint name -> the file tensors the folder stores for it (itself alone when kept dense)."""
    out: dict[str, list[tuple[str, StoredTensor]]] = {}
    for fname, st in stored_tensors(spec, fmt).items():
        out.setdefault(fname[: len(fname) - len(st.suffix)], []).append((fname, st))
    return out


def encode_device() -> str:
    """Where `convert` and `synth` encode: a GPU when there is one (magnitude pruning's per-row top-k of a
    70B shape takes about a minute a layer on two CPU cores, milliseconds on a GPU), else the CPU.
    OFFBATCH_ENCODE_DEVICE=cpu keeps it on the CPU (the GPU's top-k may break ties between equal
    magnitudes differently, so a folder can differ in which of two equal weights it kept)."""
    wanted = os.environ.get("OFFBATCH_ENCODE_DEVICE", "").strip()
    if not wanted:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(wanted)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise OffbatchError(f"OFFBATCH_ENCODE_DEVICE={wanted!r}: cpu, cuda or cuda:N")
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise OffbatchError(f"OFFBATCH_ENCODE_DEVICE={wanted!r}: this machine has no such CUDA device")
    return wanted


def encode_tensor(ckpt, canonical: str, name: str, local: str, fmt: WeightFormat,
                  dtype: torch.dtype, key=None, prune: Callable | None = None,
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """One checkpoint tensor as the folder stores it: file name -> tensor. prune(key, local, tensor): zeroes
    what a pruning method drops before the format encodes it (tools/prune.py); the format encodes on
    `device`, the stored tensors come back to the CPU."""
    t = ckpt.get(canonical)
    if not fmt.compresses(local, tuple(t.shape)):
        return {name: t.to(dtype).cpu()}
    if prune is not None:
        t = prune(key, local, t)
    try:
        stored = fmt.encode(local, t.to(device), dtype)
    except ValueError as e:
        raise ModelFolderError(f"tensor {name} cannot be stored in {fmt.name}: {e}") from None
    return {name + s[len(local):]: v.cpu() for s, v in stored.items()}


def _names(ckpt) -> list[str]:
    """The checkpoint names the folder stores, in writing order (a tied head is not stored)."""
    return [name for name, info in expected_tensors(ckpt.spec).items() if info.canonical in ckpt.entries]


def _groups(ckpt, fmt: WeightFormat, dtype: torch.dtype, by_kind: dict[str, list[int]],
            prune: Callable | None = None, device: str = "cpu") -> list[TensorGroup]:
    """What the folder's weight files hold, checkpoint tensor by checkpoint tensor (encoded when their shard
    is written); by_kind gets each module kind's bytes before and after."""
    from offbatch.models.catalogue import local_name

    spec = ckpt.spec
    stored = _stored_by_name(spec, fmt)
    groups = []
    infos = expected_tensors(spec)
    for name in _names(ckpt):
        info = infos[name]
        key = module_of(info.canonical, spec)
        files = stored[name]
        nbytes = sum(tensor_bytes(st.shape, st.dtype or dtype) for _, st in files)
        kind = by_kind.setdefault(module_kind(key[1]), [0, 0])
        kind[0] += ckpt.entries[info.canonical].nbytes
        kind[1] += nbytes
        make = partial(encode_tensor, ckpt, info.canonical, name, local_name(info.canonical, key), fmt, dtype, key,
                       prune, device)
        groups.append(TensorGroup(tuple(f for f, _ in files), nbytes, make))
    return groups


def copy_folder_files(model_dir: Path, into: Path) -> list[str]:
    """The tokenizer and generation files the source has, copied (regular files only). -> their names."""
    copied = []
    for name in COPIED_FILES:
        src = model_dir / name
        if not exists(src):
            continue
        with open_regular(src) as f, open(into / name, "wb") as out:
            while chunk := f.read(1 << 20):
                out.write(chunk)
        copied.append(name)
    return copied


def convert(model_dir: str | Path, out_dir: str | Path, weights: str, *, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            progress: Callable[[int, int], None] | None = None, prune: Callable | None = None,
            about: dict | None = None) -> ConvertSummary:
    """Write `model_dir` (a dense model folder) into `out_dir` stored in the format `weights`;
    progress(tensors done, tensors). prune: a pruning method's hook (tools/prune.py `pruner`); about: more
    for config.json's quantization_config (how it was pruned)."""
    from offbatch.models.loader import open_checkpoint
    from offbatch.models.spec import spec_from_config

    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    fmt = get_format(format_name(weights))
    config = check_source(model_dir)
    check_paths(model_dir, out_dir, overwrite)
    ckpt = open_checkpoint(model_dir, spec_from_config(config))
    about = {"source": model_dir.resolve().name, **(about or {})}
    return write_converted(ckpt, out_dir, fmt, config, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                           progress=progress, prune=prune, about=about,
                           add_files=lambda tmp: copy_folder_files(model_dir, tmp), start=start)


def write_converted(ckpt, out_dir: Path, fmt: WeightFormat, config: dict, *, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress=None, prune: Callable | None = None,
                    about: dict | None = None, add_files: Callable[[Path], object] | None = None,
                    start: float | None = None) -> ConvertSummary:
    """The folder of checkpoint `ckpt` (a loader.Checkpoint, or anything with its spec, entries, get and
    dtype: tools/synth.py's SynthCheckpoint) stored in `fmt`, written atomically at out_dir; add_files(tmp)
    writes the tokenizer and generation files beside the weights."""
    start = time.perf_counter() if start is None else start
    dtype = ckpt.dtype()  # the compute dtype the source runs in by default: the dense tensors keep it
    by_kind: dict[str, list[int]] = {}
    groups = _groups(ckpt, fmt, dtype, by_kind, prune, encode_device())
    about = dict(about or {})
    group = getattr(fmt, "group", None) or getattr(fmt, "blocksize", None)
    if group:
        about["group"] = group
    config = {**config, "torch_dtype": str(dtype).removeprefix("torch."),
              "quantization_config": quantization_config(fmt, **about)}

    with atomic_folder(out_dir, overwrite) as tmp:
        total = write_weights(tmp, groups, max_shard_bytes, progress)
        if add_files is not None:
            add_files(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    compressed = sum(g.names != (name,) for name, g in zip(_names(ckpt), groups))
    return ConvertSummary(out_dir, fmt.name, len(groups), compressed, sum(e.nbytes for e in ckpt.entries.values()),
                          total, time.perf_counter() - start, by_kind)


# ---- the quality ---------------------------------------------------------------------------------

def eval_windows(model_dir: Path, text: str, max_windows: int, window: int = EVAL_WINDOW):
    """The text's tokens (by the source's tokenizer, no special tokens) and the windows scored: up to
    max_windows of `window` tokens (at most the model's context). -> (tokens, windows, window)."""
    from offbatch.models.spec import load_spec
    from offbatch.models.tokenizer import load_tokenizer
    from offbatch.tools.quality import windows

    window = min(window, load_spec(model_dir).max_position)
    ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False)
    return ids, windows(ids, window, None, max_windows), window


def measure_quality(source: Path, converted: Path, wins, label: str, device: str = "cpu", dtype: str | None = None,
                    on_window: Callable[[str, int, int], None] | None = None) -> dict:
    """Perplexity of the source ("dense") and of the converted folder (`label`, its format) over `wins`, and
    the converted model's greedy agreement with the source's; each model is loaded from its folder by the
    reference forward (in the format it is stored in), one at a time. on_window(which, windows done,
    windows) reports progress."""
    from offbatch.engine.reference import ReferenceModel
    from offbatch.tools.quality import agreement_of, score

    rows, scores = [], []
    for which, folder in (("dense", source), (label, converted)):
        t0 = time.perf_counter()
        model = ReferenceModel.load(folder, device=device, dtype=dtype)
        used_dtype = str(model.dtype).removeprefix("torch.")
        s = score(model, wins, None if on_window is None else (lambda k, w=which: on_window(w, k + 1, len(wins))))
        del model
        scores.append(s)
        rows.append({"weights": which, "perplexity": s.perplexity, "nll": s.nll, "tokens": s.tokens,
                     "seconds": time.perf_counter() - t0})
    rows[1]["agreement"] = agreement_of(scores[0], scores[1])
    return {"window": len(wins[0].ids), "windows": len(wins), "scored_tokens": scores[0].tokens,
            "device": device, "dtype": used_dtype, "results": rows}


def write_report(out_dir: Path, report: dict) -> Path:
    """OUT_DIR/offbatch_quality.json, replaced whole (written beside it, then renamed)."""
    path = Path(out_dir) / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputFileError(f"writing {path} failed: {e.strerror or e}") from None
    return path
