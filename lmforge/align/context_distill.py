"""Safety context distillation (Askell et al., 2021; Touvron et al., 2023, section 4.2.4): the policy answers each
prompt under a safety system prompt, and the answer becomes an SFT target for the prompt without it, so the tuned
model behaves as if the system prompt were always there."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lmforge.align.rollouts import sample_groups
from lmforge.errors import LmforgeError
from lmforge.finetune.formats import FORMATS, load_conversations

SAFETY_PROMPT = (
    "You are a safe and responsible assistant. Answer ordinary questions helpfully. If a request asks for something "
    'harmful, dangerous, unethical or illegal, do not help: reply "I\'m sorry, but I cannot help with that." and '
    "say briefly why."
)
"""Llama 2's safety preprompt in spirit, and naming a reply that eval/safety.py's refusal test recognises."""


def read_prompts(path: str | Path, fmt: str = "messages", limit: int = 0) -> list[str]:
    """The first user turn of each conversation of a data file (build-refusals' output, alpaca, hh-rlhf, ...)."""
    if fmt not in FORMATS:
        raise LmforgeError(f"--format {fmt!r} is unknown; choose from {', '.join(FORMATS)}")
    if not Path(path).is_file():
        raise LmforgeError(f"--prompts {path} is not a file; give conversations in format {fmt}")
    conversations, _ = load_conversations(path, fmt)
    prompts = [next((m["content"] for m in c if m["role"] == "user"), "") for c in conversations]
    prompts = [p for p in prompts if p.strip()][: limit or None]
    if not prompts:
        raise LmforgeError(f"{path} holds no conversation with a user turn in format {fmt}; check --format")
    return prompts


def distill(
    model,
    tokenizer,
    prompts: list[str],
    system: str = SAFETY_PROMPT,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    batch: int = 64,
    keep_unfinished: bool = False,
) -> tuple[list[dict], Counter]:
    """{messages: [user, assistant], kind: "distilled"} for each prompt whose answer under `system` ended by itself
    (a reply cut at max_new_tokens would teach the model to stop mid-sentence, unless `keep_unfinished`), and counts.
    The engine answers `batch` prompts per call."""
    if not system.strip():
        raise LmforgeError("--system is empty; context distillation needs the system prompt whose effect it keeps")
    records, counts = [], Counter(prompts=len(prompts))
    encoded = [
        tokenizer.encode_chat(
            [{"role": "system", "content": system}, {"role": "user", "content": p}],
            add_generation_prompt=True,
            bos=True,
        )
        for p in prompts
    ]
    fits = [i for i, ids in enumerate(encoded) if len(ids) + 8 <= model.cfg.max_seq_len]
    counts["too long"] = len(prompts) - len(fits)
    for start in range(0, len(fits), batch):
        chunk = fits[start : start + batch]
        groups = sample_groups(
            model, tokenizer, [encoded[i] for i in chunk], 1, max_new_tokens, temperature, seed=seed + start
        )
        for i, group in zip(chunk, groups, strict=True):
            reply = group[0]
            if not (reply.finished or keep_unfinished) or not reply.text.strip():
                counts["unfinished"] += 1
                continue
            messages = [{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": reply.text.strip()}]
            records.append({"messages": messages, "kind": "distilled"})
    counts["distilled"] = len(records)
    return records, counts
