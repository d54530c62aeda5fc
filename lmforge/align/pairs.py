"""Preference pairs (a chat prompt, a chosen and a rejected reply) read from hh-rlhf transcripts, stack-exchange
answers or plain {prompt, chosen, rejected} records, split by prompt and encoded for the reward model and DPO."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lmforge.align.config import AlignDataConfig
from lmforge.align.sequences import SequenceBatch, encode_reply, make_batch
from lmforge.errors import LmforgeError
from lmforge.finetune.formats import BadRecord, Conversation, from_hh_rlhf, from_messages, read_records


@dataclass
class Pair:
    prompt: Conversation
    chosen: str
    rejected: str
    margin: float = 0.0
    """How much more the chosen reply is preferred (the record's `margin`; 0 when it gives none)."""


@dataclass
class EncodedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float


def _last_turns(record: dict[str, Any]) -> Pair:
    """hh-rlhf: both transcripts share every turn but the last assistant one, which is the pair."""
    chosen, rejected = (from_hh_rlhf({"chosen": record.get(key)}) for key in ("chosen", "rejected"))
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BadRecord("no assistant turn at the end of a transcript")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("malformed: chosen and rejected transcripts differ before their last assistant turn")
    return Pair(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"malformed: {key!r} missing or not text")
    return value


def _stack_exchange(record: dict[str, Any]) -> Pair:
    prompt = [{"role": "user", "content": _text(record, "question")}]
    return Pair(prompt, _text(record, "response_j"), _text(record, "response_k"))


def _pairs(record: dict[str, Any]) -> Pair:
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        messages = from_messages({"messages": prompt})
    else:
        raise BadRecord("malformed: 'prompt' missing or neither text nor a message list")
    margin = record.get("margin", 0.0)
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not math.isfinite(margin):
        raise BadRecord("malformed: 'margin' is not a number")
    return Pair(messages, _text(record, "chosen"), _text(record, "rejected"), float(margin))


READERS: dict[str, Callable[[dict[str, Any]], Pair]] = {
    "hh_rlhf": _last_turns,
    "stack_exchange": _stack_exchange,
    "pairs": _pairs,
}


def read_pairs(path: str, fmt: str, limit: int = 0) -> tuple[list[Pair], Counter]:
    """Every record of `path` as a pair, and the count of records rejected per reason."""
    if fmt not in READERS:
        raise LmforgeError(f"data.format={fmt} holds no preference pairs; use hh_rlhf, stack_exchange or pairs")
    records = read_records(path)
    pairs, rejected = [], Counter()
    for record in records[:limit] if limit else records:
        try:
            if not isinstance(record, dict):
                raise BadRecord("malformed: not a JSON object")
            pair = READERS[fmt](record)
        except BadRecord as e:
            rejected[str(e)] += 1
            continue
        if pair.chosen.strip() == pair.rejected.strip():
            rejected["chosen and rejected are identical"] += 1
            continue
        pairs.append(pair)
    return pairs, rejected


def prompt_key(prompt: Conversation) -> bytes:
    """What the split hashes: the first user turn (one prompt's pairs all land on the same side)."""
    first = next((m["content"] for m in prompt if m["role"] == "user"), "")
    return hashlib.sha256(first.encode()).digest()


@dataclass
class PairData:
    train: list[EncodedPair]
    val: list[EncodedPair]
    rejected: Counter
    val_pairs: list[Pair]


def load_pairs(dc: AlignDataConfig, tokenizer, context: int) -> PairData:
    """Read, encode (dropping pairs longer than data.max_len or the context, counted) and split by prompt hash: the
    prompts whose hashes sort first, data.val_fraction of them (at least one), are held out."""
    pairs, rejected = read_pairs(dc.path, dc.format, dc.limit)
    limit = min(dc.max_len or context + 1, context + 1)  # inputs are one shorter than prompt + reply
    encoded = []
    for pair in pairs:
        prompt, chosen = encode_reply(tokenizer, pair.prompt, pair.chosen)
        _, rejected_ids = encode_reply(tokenizer, pair.prompt, pair.rejected)
        if len(prompt) + max(len(chosen), len(rejected_ids)) > limit:
            rejected[f"longer than data.max_len ({limit} tokens)"] += 1
            continue
        encoded.append((prompt_key(pair.prompt), pair, EncodedPair(prompt, chosen, rejected_ids, pair.margin)))
    keys = sorted({key for key, _, _ in encoded})
    n_val = min(len(keys) - 1, max(1, round(dc.val_fraction * len(keys))))
    held = set(keys[:n_val])
    train = [e for key, _, e in encoded if key not in held]
    val = [(p, e) for key, p, e in encoded if key in held]
    if not train or not val:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(rejected.items())) or "none rejected"
        raise LmforgeError(
            f"{dc.path} leaves {len(train)} training and {len(val)} held-out pairs with distinct prompts ({reasons}); "
            f"give more {dc.format} records (at least two prompts) that fit data.max_len"
        )
    return PairData(train, [e for _, e in val], rejected, [p for p, _ in val])


def describe_rejected(rejected: Counter) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(rejected.items()))


def pair_batch(pairs: list[EncodedPair], pad_id: int) -> SequenceBatch:
    """2B rows: the B chosen replies after their prompts, then the B rejected ones (one forward pass for both)."""
    prompts = [p.prompt for p in pairs] * 2
    return make_batch(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def margins(pairs: list[EncodedPair]) -> torch.Tensor:
    return torch.tensor([p.margin for p in pairs], dtype=torch.float32)


@dataclass
class PackedSequences:
    """n prompt-and-reply sequences packed end to end into R rows of width W (first-fit decreasing), each attending
    only to itself through models/packed.py's PackedRows: inputs x, targets y, segments (-1 on padding), and owner,
    the sequence whose reply token each target is (-1 elsewhere)."""

    x: Tensor
    y: Tensor
    segments: Tensor
    owner: Tensor
    n: int

    def to(self, device) -> PackedSequences:
        return PackedSequences(*(t.to(device) for t in (self.x, self.y, self.segments, self.owner)), self.n)


PACK_WIDTH = 512
"""Rows at least this wide (or the context, if shorter) when packing: fewer rows of padding, an attention mask that
stays small."""


def pack_sequences(prompts: list[list[int]], replies: list[list[int]], pad_id: int, context: int) -> PackedSequences:
    n = len(prompts)
    lengths = [len(p) + len(r) - 1 for p, r in zip(prompts, replies, strict=True)]  # inputs drop the last token
    width = max(max(lengths), min(context, PACK_WIDTH))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(n), key=lambda i: -lengths[i]):
        r = next((j for j, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    R = len(rows)
    x = torch.full((R, width), pad_id, dtype=torch.long)
    y = torch.full((R, width), -100, dtype=torch.long)
    segments = torch.full((R, width), -1, dtype=torch.long)
    owner = torch.full((R, width), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            ids = torch.tensor(prompts[i] + replies[i])
            T, P = lengths[i], len(prompts[i])
            x[r, at : at + T], y[r, at : at + T], segments[r, at : at + T] = ids[:-1], ids[1:], s
            owner[r, at + P - 1 : at + T] = i  # targets P-1.. are the reply's tokens
            at += T
    y[owner < 0] = -100
    return PackedSequences(x, y, segments, owner, n)


def packed_pairs(pairs: list[EncodedPair], pad_id: int, context: int) -> PackedSequences:
    """The B chosen sequences (0..B-1), then the B rejected (B..2B-1), packed."""
    prompts = [p.prompt for p in pairs] * 2
    return pack_sequences(prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, context)
