"""Refusal SFT data (Bai et al., 2022's hh-rlhf harmless pairs): the harmful requests a rejected reply complied with,
each answered by a refusal, mixed with benign helpful conversations so the model does not learn to refuse everything."""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.eval.safety import is_refusal
from lmforge.finetune.formats import FORMATS, BadRecord, Conversation, from_hh_rlhf, load_conversations, read_records

REFUSALS = (
    "I'm sorry, but I can't help with that. It could hurt someone.",
    "I cannot help with that request, because it could cause real harm. Is there something else I can do for you?",
    "I'm sorry, I can't assist with that. If you have another question, I'm happy to help.",
    "I apologize, but I won't help with this: it could be dangerous or hurt other people.",
    "Sorry, that's not something I can help with. It could put people at risk.",
    "I cannot provide that. Helping with it could cause harm, so I have to decline.",
)
"""Each one holds a phrase of eval/safety.py's refusal test, so a model that learnt them is scored as refusing."""
MIN_COMPLY_WORDS = 10
"""A rejected reply shorter than this is taken to engage too little to have complied."""
MAX_REFUSAL_WORDS = 60
DECLINES = re.compile(r"\b(can't|cannot|won't|not able to|not going to|not allowed|not programmed)\b", re.IGNORECASE)
"""A chosen reply that the refusal test flags is kept as the target only when it also declines in so many words:
many hh-rlhf "refusals" are confusion ("Sorry, I'm not sure what you're asking")."""


def normalise(text: str) -> str:
    # hh-rlhf writes curly apostrophes; the refusal test (GCG's prefixes) matches "I'm sorry" with a straight one
    return text.replace("\u2019", "'").replace("\u2018", "'").strip()


def refusal_pair(record: dict) -> tuple[str, str] | str:
    """(harmful request, refusal) of one single-turn hh-rlhf harmless pair, or the reason it is not one.

    A request is harmful when the rejected reply complied: it is not a refusal and has at least MIN_COMPLY_WORDS
    words, and the chosen reply is safer: it refuses, or it says less than the rejected one (in harmless-base both
    replies often engage, and the longer, rejected one is the one that carries the harmful details). Only single-turn
    transcripts are used: SFT trains every assistant turn, and earlier turns of a red-team transcript often comply.
    The chosen reply is the target when it is itself a short refusal that declines (DECLINES), else a template
    refusal picked by the request's hash."""
    try:
        chosen = from_hh_rlhf(record)
        rejected = from_hh_rlhf({"chosen": record.get("rejected")})
    except BadRecord as e:
        return str(e)
    if len(chosen) != 2 or len(rejected) != 2 or chosen[-1]["role"] != "assistant":
        return "not single-turn"
    request, good, bad = (
        normalise(chosen[0]["content"]),
        normalise(chosen[1]["content"]),
        normalise(rejected[1]["content"]),
    )
    if not request:
        return "empty request"
    if is_refusal(bad) or len(bad.split()) < MIN_COMPLY_WORDS:
        return "rejected reply did not comply"
    refuses = is_refusal(good)
    if not refuses and len(good.split()) >= len(bad.split()):
        return "chosen reply not safer"
    if refuses and DECLINES.search(good) and len(good.split()) <= MAX_REFUSAL_WORDS and "Human:" not in good:
        return request, good
    pick = int.from_bytes(hashlib.sha256(request.encode()).digest()[:4], "big") % len(REFUSALS)
    return request, REFUSALS[pick]


def build_refusals(
    pairs: str | Path,
    benign: str | Path = "",
    benign_format: str = "alpaca",
    benign_ratio: float = 1.0,
    seed: int = 0,
    limit: int = 0,
) -> tuple[list[dict], Counter]:
    """Messages records ({messages, kind}), refusals and benign conversations shuffled together, and counts."""
    if not Path(pairs).is_file():
        raise LmforgeError(f"--pairs {pairs} is not a file; give hh-rlhf harmless pairs ({{chosen, rejected}} JSONL)")
    if benign_format not in FORMATS:
        raise LmforgeError(f"--benign-format {benign_format!r} is unknown; choose from {', '.join(FORMATS)}")
    if benign_ratio < 0:
        raise LmforgeError(f"--benign-ratio {benign_ratio} must be >= 0")
    records = read_records(pairs)[: limit or None]
    counts: Counter = Counter(pairs=len(records))
    refusals: list[Conversation] = []
    seen: set[str] = set()
    for record in records:
        got = refusal_pair(record) if isinstance(record, dict) else "malformed: not a JSON object"
        if isinstance(got, str):
            counts[got] += 1
        elif got[0] in seen:
            counts["duplicate request"] += 1
        else:
            seen.add(got[0])
            counts["refusals (chosen reply)" if got[1] not in REFUSALS else "refusals (template)"] += 1
            refusals.append([{"role": "user", "content": got[0]}, {"role": "assistant", "content": got[1]}])
    if not refusals:
        raise LmforgeError(f"{pairs} gave no refusal examples (no single-turn pair whose rejected reply complied)")
    rng = random.Random(seed)
    helpful: list[Conversation] = []
    if benign:
        if not Path(benign).is_file():
            raise LmforgeError(f"--benign {benign} is not a file; give helpful conversations ({benign_format})")
        helpful, rejected = load_conversations(benign, benign_format)
        rng.shuffle(helpful)
        helpful = helpful[: round(benign_ratio * len(refusals))]
        counts["benign"] = len(helpful)
        counts["benign rejected"] = sum(rejected.values())
    mixed = [{"messages": c, "kind": "refusal"} for c in refusals] + [
        {"messages": c, "kind": "benign"} for c in helpful
    ]
    rng.shuffle(mixed)
    return mixed, counts
