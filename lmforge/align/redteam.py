"""Red-teaming a chat model: the share of harmful requests it refuses (AdvBench; Zou et al., 2023) beside the share of
benign questions it refuses (over-refusal; the Vicuna questions), each reply generated greedily through the chat
template by the serving engine and judged by eval/safety.py's refusal test."""

from __future__ import annotations

import time
from pathlib import Path

from lmforge.align.rollouts import sample_groups
from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.eval.safety import is_refusal, refusal_rate
from lmforge.eval.tasks import load_task, read_items

SUITES = {"advbench": "advbench", "benign": "overrefusal"}
"""What redteam reports -> the eval task (configs/eval/) whose data and prompt template it reads."""


def suite_prompts(task_name: str, path: str | Path | None = None, limit: int = 0) -> list[str]:
    """The prompts of an eval task's items, rendered by the task's own template (its data file unless `path`)."""
    task = load_task(task_name)
    items = read_items(task, path or task.data)
    prompts = [task.render(task.prompt, item).strip() for item in items]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise LmforgeError(f"{path or task.data} holds no non-empty {task_name} prompts; give the task's data file")
    return prompts[:limit] if limit else prompts


def chat_replies(
    model, tokenizer, requests: list[str], max_new_tokens: int, batch: int = 64, system: str = ""
) -> list[str]:
    """Greedy replies to single-turn chats (after an optional system prompt), `batch` requests per engine call so
    the KV cache stays bounded. A request too long for the model's context gets the empty reply."""
    head = [{"role": "system", "content": system}] if system else []
    encoded = [tokenizer.encode_chat([*head, {"role": "user", "content": r}], add_generation_prompt=True, bos=True)
               for r in requests]  # fmt: skip
    fits = [i for i, ids in enumerate(encoded) if len(ids) < model.cfg.max_seq_len]
    replies = [""] * len(requests)
    for start in range(0, len(fits), batch):
        chunk = fits[start : start + batch]
        groups = sample_groups(model, tokenizer, [encoded[i] for i in chunk], 1, max_new_tokens, temperature=0.0)
        for i, group in zip(chunk, groups, strict=True):
            replies[i] = group[0].text
    return replies


def redteam_run(
    run: str | Path, suites: dict[str, list[str]], max_new_tokens: int, batch: int = 64, keep: int = 5
) -> dict:
    """Refusal rate per suite for one run, with the first `keep` (prompt, reply, refused) of each."""
    model, tokenizer = load_run(run)
    t0 = time.perf_counter()
    out: dict = {"run": str(run)}
    for name, prompts in suites.items():
        replies = chat_replies(model, tokenizer, prompts, max_new_tokens, batch)
        out[f"{name}_refusal_rate"] = refusal_rate(prompts, replies)
        out[f"{name}_n"] = len(prompts)
        out[f"{name}_samples"] = [
            {"prompt": p, "reply": r, "refused": is_refusal(r)}
            for p, r in zip(prompts[:keep], replies[:keep], strict=True)
        ]
    out["seconds"] = time.perf_counter() - t0
    return out


def table(results: dict[str, dict], suites: list[str]) -> str:
    """One line per run: its refusal rate on each suite, in percent."""
    width = max(len("run"), *(len(r) for r in results))
    lines = [f"{'run':<{width}} | " + " | ".join(f"{s + ' refusal':>16}" for s in suites)]
    for name, row in results.items():
        rates = [f"{100 * row[f'{s}_refusal_rate']:>14.1f} %" for s in suites if f"{s}_refusal_rate" in row]
        lines.append(f"{name:<{width}} | " + " | ".join(rates))
    return "\n".join(lines)
