"""Shared pieces for the jobs tests: a word-level tokenizer whose text is easy to predict, and
EchoGenerator, a fake engine that follows the Generator contract on text a test can predict."""

from __future__ import annotations

import json
from pathlib import Path

from offbatch.engine.api import GenOutput, GenStats

SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = (
    "the a an is are was what why how who where when which of to in on and or not it this that "
    "sky blue green red cat dog sun moon star sea tree rock bird fish one two three four five six "
    "seven eight nine ten stop end go yes no hello world please tell me about capital france paris "
    "water fire earth air light dark big small"
).split()
VOCAB = SPECIALS + WORDS
EOS, END = VOCAB.index("</s>"), VOCAB.index("<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(folder: Path, chat_template: str | None = CHAT_TEMPLATE, generation_config: dict | None = None,
                    add_bos: bool = True) -> None:
    """tokenizer.json (word level: decode joins words with spaces), tokenizer_config.json and
    generation_config.json; eos is </s> and <|end|>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": add_bos}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = {"eos_token_id": [EOS, END], **(generation_config or {})}
    (folder / "generation_config.json").write_text(json.dumps(gen))


class EchoGenerator:
    """Fake engine: sequence i generates its prompt's ids again, cyclically, in waves of max_batch.
    It stops on eos (unless ignore_eos, or before min_tokens), on a stop token id, on stop_check,
    or at max_tokens: the same rules as the real generator loop, on text a test can predict."""

    def __init__(self, eos_token_ids=(EOS, END), max_batch: int = 4):
        self.eos = set(eos_token_ids)
        self.max_batch = max_batch
        self.stats = GenStats()
        self.seen_keys: list[int] = []

    def _finish(self, req, out):
        p = req.params
        if len(out) >= p.min_tokens and not p.ignore_eos and out[-1] in self.eos:
            return "stop"
        if len(out) >= p.min_tokens and out[-1] in p.stop_token_ids:
            return "stop"
        if req.stop_check is not None and req.stop_check(out):
            return "stop"
        if len(out) >= p.max_tokens:
            return "length"
        return None

    def generate(self, requests):
        pending = iter(requests)
        live = []
        while True:
            while len(live) < self.max_batch:
                req = next(pending, None)
                if req is None:
                    break
                self.seen_keys.append(req.key)
                self.stats.prompt_tokens += len(req.prompt_ids)
                live.append((req, []))
            if not live:
                return
            still = []
            for req, out in live:
                out.append(req.prompt_ids[len(out) % len(req.prompt_ids)])
                self.stats.generated_tokens += 1
                reason = self._finish(req, out)
                if reason:
                    yield GenOutput(req.key, list(out), reason, len(req.prompt_ids))
                else:
                    still.append((req, out))
            live = still


def synth_llama(folder: Path, seed: int = 3) -> Path:
    """A real tiny Llama folder written by `offbatch synth` (its own tokenizer)."""
    from typer.testing import CliRunner

    from offbatch.cli.main import app

    r = CliRunner().invoke(app, ["synth", "llama", str(folder), "--seed", str(seed), "--quiet"])
    assert r.exit_code == 0, r.output
    return folder


def write_jsonl(path: Path, rows) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are, for bad lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
