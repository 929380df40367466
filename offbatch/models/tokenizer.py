"""Tokenizer, special tokens, eos ids and chat template of a Hugging Face model folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from offbatch.errors import ModelFolderError


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


@dataclass
class Tokenizer:
    backend: object  # tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    chat_template: str | None = None
    generation_defaults: dict = field(default_factory=dict)
    special_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The tokenizer.json post-processor adds bos where the model's tokenizer does (Llama-3 and
        # the like); tokenizer_config's add_bos_token covers folders whose post-processor does not.
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token is not None:
            bos = self.backend.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if not self.chat_template:
            raise ModelFolderError(
                "this model has no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'); "
                "send {'prompt': ...} lines instead of {'messages': ...}"
            )
        return _render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens, extra)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        # The template already writes bos where the model wants it. template_kwargs: a request's
        # chat_template_kwargs (e.g. Qwen3's enable_thinking), visible to the template as variables.
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def _render_chat(template: str, messages, add_generation_prompt, special_tokens, extra) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens, **extra
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelFolderError(f"{path} not found: offbatch needs the fast-tokenizer file tokenizer.json")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ModelFolderError(f"{path} cannot be read: {e}") from None
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    gen_cfg = _read_json(model_dir / "generation_config.json")
    cfg = _read_json(model_dir / "config.json")

    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(tok_cfg.get(key))
        if text is not None:
            special[key] = text

    # eos: generation_config (may be a list) first, then config.json, then the tokenizer's eos token.
    eos = _ids(gen_cfg.get("eos_token_id")) or _ids(cfg.get("eos_token_id"))
    if special.get("eos_token"):
        tid = backend.token_to_id(special["eos_token"])
        if tid is not None and tid not in eos:
            eos.append(tid)

    template = None
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        template = jinja_path.read_text()
    elif isinstance(tok_cfg.get("chat_template"), str):
        template = tok_cfg["chat_template"]
    elif isinstance(tok_cfg.get("chat_template"), list):  # named templates: take "default"
        named = {t.get("name"): t.get("template") for t in tok_cfg["chat_template"]}
        template = named.get("default") or next(iter(named.values()), None)

    defaults = {
        k: gen_cfg[k]
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "do_sample")
        if k in gen_cfg
    }
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(eos),
        bos_token=special.get("bos_token"),
        eos_token=special.get("eos_token"),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        chat_template=template,
        generation_defaults=defaults,
        special_tokens=special,
    )
