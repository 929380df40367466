"""A cheap fingerprint of a model folder: what a resumed run compares before it keeps an earlier result.

Hashing every weight byte of a 100 GB model would take minutes on every rerun, so each file is
fingerprinted by what changes when the model changes:
- the files that decide tokenization, prompts and defaults (config.json, generation_config.json, the
  tokenizer files, the chat template, the shard index: CONFIG_NAMES and *.safetensors.index.json at
  the top of the folder) by their whole content;
- each weight file (*.safetensors, *.gguf) by its size, its header (a safetensors file's JSON header,
  which names every tensor's dtype, shape and offsets; a GGUF file's first 8 MiB, its metadata) and
  SAMPLES of 4 KiB of data bytes spread evenly over the file.
Other files (README, LICENSE, images) do not decide a result and are left out. Only regular files are
read (a FIFO or a device in the folder is named, never opened), and a file is found by content, not
by path: a copied or moved folder keeps its fingerprint. A weight file retrained in place with the
same shapes is still noticed by its sampled bytes, bar a change that misses every sample.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

# Named, not every *.json: a plan file or offbatch's own OUT.offbatch.json kept in the model folder
# must not change the model's fingerprint.
CONFIG_NAMES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                "tokenizer.model", "chat_template.json", "chat_template.jinja")
CONFIG_SUFFIXES = (".safetensors.index.json",)
WEIGHT_SUFFIXES = (".safetensors", ".gguf")
WHOLE_LIMIT = 256 * 2**20  # a "config" file larger than this is sampled like weights
SAMPLES = 16
SAMPLE_BYTES = 4096
SAFETENSORS_HEADER_LIMIT = 100 * 2**20  # the format's own bound on its JSON header
GGUF_HEAD = 8 * 2**20


def _digest(h) -> str:
    return h.hexdigest()[:24]


def _hash_whole(f) -> str:
    h = hashlib.sha256(b"whole\0")
    for block in iter(lambda: f.read(2**20), b""):
        h.update(block)
    return _digest(h)


def _head_bytes(f, name: str, size: int) -> int:
    """How many leading bytes form the file's header (all of them are hashed)."""
    if name.endswith(".safetensors") and size >= 8:
        n = int.from_bytes(f.read(8), "little")
        f.seek(0)
        return min(8 + n, size, 8 + SAFETENSORS_HEADER_LIMIT)
    if name.endswith(".gguf"):
        return min(size, GGUF_HEAD)
    return min(size, 65536)


def _hash_sampled(f, name: str, size: int) -> str:
    h = hashlib.sha256(f"sampled\0{size}\0".encode())
    head = _head_bytes(f, name, size)
    h.update(f.read(head))
    rest = size - head
    if rest > 0:
        span = max(rest - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            f.seek(head + span * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return _digest(h)


def _selected(name: str) -> str | None:
    """'config' / 'weights' for files that decide a result, else None."""
    if name.endswith(WEIGHT_SUFFIXES):
        return "weights"
    if name.endswith(CONFIG_SUFFIXES) or name in CONFIG_NAMES:
        return "config"
    return None


def file_fingerprint(path: Path, kind: str) -> str:
    """A short digest of one file, or a word saying why it has none (never raises, never blocks)."""
    try:
        st = os.stat(path)  # follows symlinks: a Hugging Face cache folder links into its blobs
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        with open(path, "rb") as f:
            if kind == "config" and st.st_size <= WHOLE_LIMIT:
                return _hash_whole(f)
            return _hash_sampled(f, path.name, st.st_size)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def model_fingerprint(model: str | Path) -> dict:
    """{"path", "digest", "parts": {file name: digest}} of a model folder (or of a single model file,
    such as a .gguf). The digest covers the parts, not the path."""
    model = Path(model)
    parts: dict[str, str] = {}
    if model.is_dir():
        try:
            names = sorted(os.listdir(model))
        except OSError as e:
            names = []
            parts["."] = f"unreadable ({e.strerror or e})"
        for name in names:
            kind = _selected(name)
            if kind is not None:
                parts[name] = file_fingerprint(model / name, kind)
    else:
        parts[model.name] = file_fingerprint(model, _selected(model.name) or "weights")
    h = hashlib.sha256(b"offbatch model fingerprint 1\0")
    for name, digest in parts.items():
        h.update(f"{name}\0{digest}\0".encode())
    return {"path": str(model.resolve()), "digest": _digest(h), "parts": parts}


def describe_difference(old: dict | None, new: dict) -> str | None:
    """'model fingerprint differs (config.json changed, model.safetensors changed)', or None when equal."""
    if not isinstance(old, dict) or not isinstance(old.get("parts"), dict):
        return None if old is None else "model fingerprint differs (the old one is unreadable)"
    if old.get("digest") == new["digest"]:
        return None
    was, now = old["parts"], new["parts"]
    what = [f"{n} changed" for n in sorted(set(was) & set(now)) if was[n] != now[n]]
    what += [f"{n} added" for n in sorted(set(now) - set(was))]
    what += [f"{n} removed" for n in sorted(set(was) - set(now))]
    where = f"; model {old.get('path')} -> {new['path']}" if old.get("path") != new["path"] else ""
    return f"model fingerprint differs ({', '.join(what) or 'another fingerprint version'}){where}"
