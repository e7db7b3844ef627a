"""Chat templates: the model's own Jinja template renders chat messages into one prompt string.

Rendered the way Hugging Face `apply_chat_template` does (sandboxed, immutable environment,
`trim_blocks`/`lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII), with the tokenizer's special tokens (`bos_token`, `eos_token`, ...) in
scope. Message contents are data for the template, never template source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Special tokens a template may refer to, as named in tokenizer_config.json.
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
CONFIG_NAME = "tokenizer_config.json"
TEMPLATE_NAME = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template rejected them)."""


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class ChatTemplate:
    def __init__(self, source: str, special_tokens: Mapping[str, str], origin: str) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.origin = origin
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._compiled = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template {origin}: {err}") from err

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as err:
            raise ChatTemplateError(str(err) or type(err).__name__) from err

    @classmethod
    def from_file(cls, path: Path, special_tokens_from: Path | None = None) -> ChatTemplate:
        """`path` is a `.jinja` file or a tokenizer_config.json with a `chat_template` key."""
        config_path = special_tokens_from
        if path.suffix == ".json":
            config = _read_config(path)
            source = _template_from_config(config, path)
            if source is None:
                raise ValueError(f"{path} has no chat_template")
            config_path = path
        else:
            source = path.read_text(encoding="utf-8")
        tokens: dict[str, str] = {}
        if config_path is not None and config_path.is_file():
            config = _read_config(config_path)
            for name in _SPECIAL_TOKENS:
                text = _token_text(config.get(name))
                if text is not None:
                    tokens[name] = text
        return cls(source, tokens, str(path))

    @classmethod
    def for_tokenizer(cls, tokenizer_path: Path) -> ChatTemplate | None:
        """The template stored next to a tokenizer.json (`chat_template.jinja`, else the
        `chat_template` key of `tokenizer_config.json`), or None when there is none."""
        folder = tokenizer_path.parent
        config = folder / CONFIG_NAME
        jinja_file = folder / TEMPLATE_NAME
        if jinja_file.is_file():
            return cls.from_file(jinja_file, special_tokens_from=config)
        if config.is_file() and _template_from_config(_read_config(config), config) is not None:
            return cls.from_file(config)
        return None


def _read_config(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _template_from_config(config: Mapping[str, Any], path: Path) -> str | None:
    tpl = config.get("chat_template")
    if tpl is None or isinstance(tpl, str):
        return tpl
    # A list of named templates: [{"name": "default", "template": "..."}, ...].
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        found = named.get("default")
        if isinstance(found, str):
            return found
    raise ValueError(f"{path}: chat_template has no usable default template")
