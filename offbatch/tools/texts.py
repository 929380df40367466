"""Where the text that measures a compressed model's quality comes from.

Real English, taken from a package registry, never from a model hub: `make setup` downloads the
`sentencepiece==0.2.1` source distribution (its `test/botchan.txt` is Natsume Soseki's "Botchan" in English,
a Project Gutenberg book, ~75k tokens) and extracts that one file to `<venv>/share/offbatch/botchan.txt`.

The default evaluation text is, first found: $OFFBATCH_EVAL_TEXT, then that file in the running Python's
environment; else there is none, and the caller says how to measure quality by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "OFFBATCH_EVAL_TEXT"
SDIST_PIN = "sentencepiece==0.2.1"
MEMBER = "sentencepiece-0.2.1/test/botchan.txt"  # inside the sdist
SHARE_PATH = Path("share") / "offbatch" / "botchan.txt"  # under the environment's prefix


def installed_text() -> Path:
    """Where `make setup` puts the evaluation text: under this Python environment's prefix."""
    return Path(sys.prefix) / SHARE_PATH


def default_eval_text() -> Path | None:
    """$OFFBATCH_EVAL_TEXT (when set, even to a missing file: the caller reports it), else the installed
    text when it is there, else None."""
    chosen = os.environ.get(ENV_VAR)
    if chosen:
        return Path(chosen).expanduser()
    path = installed_text()
    return path if path.is_file() else None
