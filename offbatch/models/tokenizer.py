"""Tokenizer, special tokens, eos ids and chat template of a Hugging Face model folder.

Every file is checked when the folder is loaded: tokenizer.json, tokenizer_config.json,
generation_config.json and chat_template.jinja must be regular files of sane size, of the right JSON
type, with fields of the right types; each problem is one ModelFolderError naming the file and field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offbatch.errors import ModelFolderError
from offbatch.models.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from offbatch.models.files import MAX_TOKENIZER_BYTES, exists, json_type, read_json_object, read_text
from offbatch.models.spec import CONFIG_FIELDS

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
                           "do_sample")


def _read_json(path: Path) -> dict:
    """An optional JSON object file: {} when absent."""
    return read_json_object(path) if exists(path) else {}


def _token_text(value, where: str) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise ModelFolderError(f"{where} must be a string or an object with a string 'content', not {json_type(value)}")


def _ids(value, where: str) -> list[int]:
    """An eos_token_id field: a token id or a list of them."""
    if value is None:
        return []
    value = CONFIG_FIELDS["eos_token_id"].check(value, where)
    return [value] if isinstance(value, int) else list(value)


def _template_text(text: Any, where: str) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ModelFolderError(f"{where} must be a string, not {json_type(text)}")
    if len(text) > MAX_TEMPLATE_CHARS:
        raise ModelFolderError(f"{where} is {len(text):,} characters; offbatch's limit for a chat template is "
                               f"{MAX_TEMPLATE_CHARS:,}")
    return text


def _chat_template(model_dir: Path, tok_cfg: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or named templates of
    which we take "default")."""
    jinja_path = model_dir / "chat_template.jinja"
    if exists(jinja_path):
        # Bytes first (4 per character at most), then characters.
        return _template_text(read_text(jinja_path, 4 * MAX_TEMPLATE_CHARS), str(jinja_path))
    value = tok_cfg.get("chat_template")
    where = "tokenizer_config.json: 'chat_template'"
    if isinstance(value, list):
        named = {}
        for t in value:
            if not (isinstance(t, dict) and isinstance(t.get("name"), str)):
                raise ModelFolderError(f"{where} must be a string or a list of {{'name', 'template'}} objects")
            named[t["name"]] = t.get("template")
        value = named.get("default", next(iter(named.values()), None))
        where += " 'default'"
    return _template_text(value, where)


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
    _template: ChatTemplate | None = field(default=None, repr=False, compare=False)  # compiled on first use

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

    def apply_chat_template(self, messages: list[dict], /, add_generation_prompt: bool = True, **extra) -> str:
        # (messages is positional-only: a template variable named 'messages' in extra cannot clash with it)
        if not self.chat_template:
            raise ModelFolderError(
                "this model has no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'); "
                "send {'prompt': ...} lines instead of {'messages': ...}"
            )
        if self._template is None or self._template.source != self.chat_template:
            self._template = ChatTemplate(self.chat_template)
        # The request's variables (chat_template_kwargs) may not replace messages or add_generation_prompt.
        variables = {**self.special_tokens, **extra, "messages": messages,
                     "add_generation_prompt": add_generation_prompt}
        return self._template.render(variables)

    def encode_chat(self, messages: list[dict], /, add_generation_prompt: bool = True, **template_kwargs) -> list[int]:
        # The template already writes bos where the model wants it. template_kwargs: a request's
        # chat_template_kwargs (e.g. Qwen3's enable_thinking), visible to the template as variables.
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not exists(path):
        raise ModelFolderError(f"{path} not found: offbatch needs the fast-tokenizer file tokenizer.json")
    text = read_text(path, MAX_TOKENIZER_BYTES)
    try:
        backend = HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise ModelFolderError(f"{path} cannot be read: {e}") from None
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    gen_cfg = _read_json(model_dir / "generation_config.json")
    # (config.json's other fields are load_spec's; a tokenizer alone may be loaded without one)
    config_eos = _ids(_read_json(model_dir / "config.json").get("eos_token_id"), "config.json: 'eos_token_id'")

    special = {}
    for key in SPECIAL_TOKEN_KEYS:
        text = _token_text(tok_cfg.get(key), f"tokenizer_config.json: {key!r}")
        if text is not None:
            special[key] = text
    add_bos = tok_cfg.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ModelFolderError("tokenizer_config.json: 'add_bos_token' must be true or false, "
                               f"not {json_type(add_bos)}")

    # eos: generation_config (may be a list) first, then config.json, then the tokenizer's eos token.
    eos = _ids(gen_cfg.get("eos_token_id"), "generation_config.json: 'eos_token_id'") or config_eos
    if special.get("eos_token"):
        tid = backend.token_to_id(special["eos_token"])
        if tid is not None and tid not in eos:
            eos.append(tid)

    template = _chat_template(model_dir, tok_cfg)
    # Sampling defaults of the wrong type or range are checked (and ignored, with a word) where they
    # are used: jobs/params.resolve_defaults.
    defaults = {k: gen_cfg[k] for k in GENERATION_DEFAULT_KEYS if k in gen_cfg}
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(eos),
        bos_token=special.get("bos_token"),
        eos_token=special.get("eos_token"),
        add_bos=bool(add_bos),
        chat_template=template,
        generation_defaults=defaults,
        special_tokens=special,
    )
