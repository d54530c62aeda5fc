"""Loss masks from the run's chat template: the tokens an assistant turn adds (its end-of-turn token included) are
trained, every prompt and template token is masked to -100; works from render/encode alone, so on any template."""

from __future__ import annotations

from lmforge.errors import LmforgeError
from lmforge.finetune.formats import Conversation

IGNORE = -100


def encode_example(tokenizer, messages: Conversation, bos: bool = True) -> tuple[list[int], list[bool]]:
    """(token ids of the whole conversation, which of them are trained). An assistant turn's trained tokens are what
    encoding messages[:i+1] adds to encoding messages[:i] with the generation prompt: its content, and whatever the
    template closes the turn with. Each of those encodings must be a prefix of the next, which holds for templates
    that render a conversation left to right."""
    ids = tokenizer.encode_chat(messages, bos=bos)
    trained = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.encode_chat(messages[:i], add_generation_prompt=True, bos=bos)
        turn = tokenizer.encode_chat(messages[: i + 1], bos=bos)
        if turn[: len(prompt)] != prompt or ids[: len(turn)] != turn:
            raise LmforgeError(
                "the chat template does not render a conversation as a prefix of its continuation, so the assistant "
                "tokens cannot be told apart; use a template that renders turns left to right"
            )
        trained[len(prompt) : len(turn)] = [True] * (len(turn) - len(prompt))
    return ids, trained


def shifted(ids: list[int], trained: list[bool]) -> tuple[list[int], list[int]]:
    """Inputs and next-token targets of one example: x = ids[:-1], y[j] = ids[j+1] where that token is trained, else
    -100."""
    return ids[:-1], [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:], strict=True)]


def marked(tokenizer, ids: list[int], trained: list[bool]) -> str:
    """The example as text with its trained spans in [[...]], to show before training what the loss sees."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and trained[j] == trained[i]:
            j += 1
        text = tokenizer.decode(ids[i:j])
        out.append(f"[[{text}]]" if trained[i] else text)
        i = j
    return "".join(out)
