"""PPO's prompts: `{prompt}` records (a string or a message list) or hh-rlhf transcripts cut before their last
assistant turn, encoded up to the chat template's generation prompt and split into train and held-out by a hash."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from lmforge.align.config import AlignDataConfig
from lmforge.errors import LmforgeError
from lmforge.finetune.formats import BadRecord, Conversation, from_hh_rlhf, read_records


def prompt_conversation(record: Any) -> Conversation:
    """The turns a reply is asked for: `prompt` as one user turn or a message list, or an hh-rlhf transcript's
    turns before its last assistant turn."""
    if not isinstance(record, dict):
        raise BadRecord("malformed: not a JSON object")
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str) and prompt.strip():
            return [{"role": "user", "content": prompt}]
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt)
        ):
            return [{"role": m["role"], "content": m["content"]} for m in prompt]
        raise BadRecord("malformed: prompt is neither text nor a list of {role, content} messages")
    if "chosen" in record:
        turns = from_hh_rlhf(record)
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=len(turns))
        if last == 0:
            raise BadRecord("malformed: transcript has no user turn before its reply")
        return turns[:last]
    raise BadRecord("malformed: neither a prompt nor an hh-rlhf chosen transcript")


def load_prompts(
    dc: AlignDataConfig, tokenizer, max_prompt_len: int
) -> tuple[list[list[int]], list[list[int]], Counter]:
    """(train prompts, held-out prompts, rejected counts by reason) as token ids ending in the generation prompt;
    duplicates are kept once, prompts longer than `max_prompt_len` are counted and skipped."""
    rejected: Counter = Counter()
    seen: dict[bytes, list[int]] = {}
    for record in read_records(dc.path)[: dc.limit or None]:
        try:
            conversation = prompt_conversation(record)
        except BadRecord as e:
            rejected[str(e)] += 1
            continue
        ids = tokenizer.encode_chat(conversation, add_generation_prompt=True, bos=True)
        if len(ids) > max_prompt_len:
            rejected[f"prompt longer than {max_prompt_len} tokens (the context less rollout.max_new_tokens)"] += 1
            continue
        seen.setdefault(hashlib.sha256(json.dumps(conversation).encode()).digest(), ids)
    ordered = [seen[k] for k in sorted(seen)]
    n_val = min(len(ordered) - 1, max(1, round(dc.val_fraction * len(ordered))))
    val, train = ordered[:n_val], ordered[n_val:]
    if not train or not val:
        reasons = ", ".join(f"{n} {why}" for why, n in rejected.items()) or "none rejected"
        raise LmforgeError(
            f"{dc.path} leaves {len(train)} training and {len(val)} held-out prompts ({reasons}); give more "
            "{prompt} records or hh-rlhf transcripts (data.format=prompts) that fit the context"
        )
    return train, val, rejected
