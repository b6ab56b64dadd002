"""Tokenizer of a local Hugging Face model directory, without transformers.

`Tokenizer` encodes and decodes with the `tokenizers` library on tokenizer.json and renders the
chat template the way transformers does (text_stream.py turns generated ids into text deltas
and finds stop strings in them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from services.hf.config import merge_ids, read_optional_json, token_id_list

# The special-token variables transformers passes to a chat template, when they are set.
_TEMPLATE_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template refused the messages."""


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes a token as a string or as a serialised AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """chat_template.jinja wins (transformers >= 4.50), then tokenizer_config.json's entry."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if template is None:
        template = read_optional_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(
                f"{model_dir}: chat templates {sorted(map(str, named))} have none named 'default'"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{model_dir}: chat_template must be a string or a list")
    return template


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks):
    rendered as its body, as transformers does when it is not tracking."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile in the environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from exc


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        eos_token_ids: list[int],
        bos_token_id: int | None = None,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        source: str = "tokenizer",
    ) -> None:
        """special_tokens: template variable -> token text, e.g. {"bos_token": "<s>"}."""
        self._backend = backend
        self._eos_token_ids = list(eos_token_ids)
        self._bos_token_id = bos_token_id
        self._special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._source = source

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"{model_dir} has no tokenizer.json (only fast tokenizers are supported)"
            )
        backend = BackendTokenizer.from_file(str(path))
        tok_config = read_optional_json(model_dir / "tokenizer_config.json")
        special = {
            name: content
            for name in _TEMPLATE_TOKENS
            if (content := _token_content(tok_config.get(name))) is not None
        }
        bos = special.get("bos_token")
        eos = special.get("eos_token")
        eos_from_tokenizer = [] if eos is None else [backend.token_to_id(eos)]
        eos_ids = merge_ids(
            token_id_list(read_optional_json(model_dir / "config.json").get("eos_token_id")),
            token_id_list(
                read_optional_json(model_dir / "generation_config.json").get("eos_token_id")
            ),
            [i for i in eos_from_tokenizer if i is not None],
        )
        return cls(
            backend,
            eos_token_ids=eos_ids,
            bos_token_id=None if bos is None else backend.token_to_id(bos),
            special_tokens=special,
            chat_template=_load_chat_template(model_dir, tok_config),
            source=str(model_dir),
        )

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (the model's may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos_token_ids)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens applies tokenizer.json's post-processor (a BOS, for Llama).
        A rendered chat template holds its own special tokens: encode it with False."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ChatTemplateError(
                f"{self._source} has no chat template (no chat_template.jinja, and no "
                "'chat_template' in tokenizer_config.json); use a completions request instead"
            )
        return compile_chat_template(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_vars: Any,
    ) -> str:
        """Render messages to the prompt text, as transformers' apply_chat_template(...,
        tokenize=False) does. Extra keyword arguments become template variables."""
        if not messages:
            raise ChatTemplateError("a chat needs at least one message")
        # Like transformers: a key set to None (OpenAI's content=None) is treated as absent.
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        try:
            return self._compiled_template.render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self._special_tokens, **template_vars},
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc
