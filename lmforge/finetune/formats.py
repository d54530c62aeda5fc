"""Instruction data as conversations: Alpaca, messages (and ShareGPT), prompt/completion pairs and hh-rlhf
transcripts, each read from a JSON list or JSONL file (optionally .gz) into lists of {role, content} messages."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

Message = dict[str, str]
Conversation = list[Message]


class BadRecord(ValueError):
    """A record that does not hold what its format promises; the reason is counted, never silently dropped."""


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRecord(f"malformed: {key!r} missing or not text")
    return value


def from_alpaca(record: dict[str, Any]) -> Conversation:
    """{instruction, input, output}: the input (when there is one) follows the instruction after a blank line."""
    instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record, "output")}]


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def from_messages(record: dict[str, Any]) -> Conversation:
    """{messages: [{role, content}]} or ShareGPT's {conversations: [{from: human|gpt|system, value}]}."""
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise BadRecord("malformed: no 'messages' or 'conversations' list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord("malformed: a turn is not an object")
        role = turn.get("role", _SHAREGPT_ROLES.get(turn.get("from")))
        content = turn.get("content", turn.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise BadRecord("malformed: a turn without a known role and text content")
        out.append({"role": role, "content": content})
    return out


def from_prompt_completion(record: dict[str, Any]) -> Conversation:
    """{prompt, completion}: one user turn and the assistant's answer."""
    return [
        {"role": "user", "content": _text(record, "prompt")},
        {"role": "assistant", "content": _text(record, "completion")},
    ]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def from_hh_rlhf(record: dict[str, Any]) -> Conversation:
    """Anthropic hh-rlhf's `chosen` transcript, `\\n\\nHuman: ... \\n\\nAssistant: ...`, split into turns."""
    transcript = _text(record, "chosen")
    parts = _HH_TURN.split(transcript)  # ['', 'Human', text, 'Assistant', text, ...]
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("malformed: transcript does not start with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1::2], parts[2::2], strict=True)]


FORMATS: dict[str, Callable[[dict[str, Any]], Conversation]] = {
    "alpaca": from_alpaca,
    "messages": from_messages,
    "prompt_completion": from_prompt_completion,
    "hh_rlhf": from_hh_rlhf,
}


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON list or a JSONL file (either optionally gzipped); a JSONL line that does not parse
    becomes None, which the format then counts as malformed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise LmforgeError(f"data.path={str(path)!r} cannot be read ({e}); give a UTF-8 .json or .jsonl file") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} is not a valid JSON list ({e}); fix it or write one record per line") from None
        return records
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append(None)
    return out


def load_conversations(path: str | Path, fmt: str) -> tuple[list[Conversation], Counter]:
    """Every record of `path` read by format `fmt`, and the count of records rejected per reason."""
    reader = FORMATS[fmt]
    conversations, rejected = [], Counter()
    for record in read_records(path):
        try:
            if not isinstance(record, dict):
                raise BadRecord("malformed: not a JSON object")
            conversation = reader(record)
        except BadRecord as e:
            rejected[str(e)] += 1
            continue
        if not any(m["role"] == "assistant" for m in conversation):
            rejected["no assistant turn"] += 1
            continue
        conversations.append(conversation)
    return conversations, rejected
