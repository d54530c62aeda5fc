"""Jinja chat templates of imported tokenizers, rendered as transformers' apply_chat_template renders them, and split
into the template's own text and the messages' contents so that only the template's markers become special tokens."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# Private-use characters stand in for each message's content while the template renders.
_OPEN, _CLOSE = "\ue000", "\ue001"


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # templates come from downloaded files, hence the sandbox; the settings and globals are transformers'
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # Llama 3.1's template dates its prompt
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise LmforgeError(f"the tokenizer's chat template does not compile ({e}); fix tokenizer_config.json") from None


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, str]) -> str:
    """The chat's text; `variables` are the special tokens by name (bos_token, eos_token, ...)."""
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise LmforgeError(f"the chat template refused these messages: {e}") from None


def split(
    source: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, str]
) -> list[tuple[str, bool]]:
    """render()'s text as (piece, is_a_message_content) pairs, in order.

    The template is rendered once with a placeholder for each content; when that placeholder render, with the contents
    put back, is not exactly the real text (a template that trims or rewrites contents), the whole text is one
    template piece, which is what transformers encodes in every case."""
    text = render(source, messages, add_generation_prompt, variables)
    stand_in = [f"{_OPEN}{i}{_CLOSE}" for i in range(len(messages))]
    masked = [{**m, "content": stand_in[i]} if isinstance(m.get("content"), str) else m for i, m in enumerate(messages)]
    shape = render(source, masked, add_generation_prompt, variables)
    pieces: list[tuple[str, bool]] = []
    rest = shape
    for i, m in enumerate(messages):
        if not isinstance(m.get("content"), str) or stand_in[i] not in rest:  # a template may leave a message out
            continue
        before, _, rest = rest.partition(stand_in[i])
        if stand_in[i] in rest:
            return [(text, False)]
        pieces += [(before, False), (m["content"], True)]
    pieces.append((rest, False))
    if "".join(p for p, _ in pieces) != text:
        return [(text, False)]
    return [(p, c) for p, c in pieces if p]
