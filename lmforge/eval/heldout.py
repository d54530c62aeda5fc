"""The speedrun's evaluation: bits per byte of the run's held-out split, and a next-line choice built from it (the
true next line or a line from elsewhere), which a model of a few minutes' training gets right more often than chance.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace

import numpy as np

from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.data.shards import shard_arrays
from lmforge.eval.backends import Local
from lmforge.eval.cli import evaluate, write_summary
from lmforge.eval.tasks import load_task
from lmforge.run import Run


def heldout_texts(val_dir, tokenizer, max_bytes: int) -> list[str]:
    """The first documents of a val shard folder (each stored as bos, text, eos), up to about max_bytes of text."""
    tokens = np.concatenate(shard_arrays(val_dir)).tolist()
    texts, size, start = [], 0, 0
    for i, t in enumerate(tokens):
        if t == tokenizer.eos_id:
            text = tokenizer.decode([x for x in tokens[start:i] if x != tokenizer.bos_id])
            texts.append(text)
            size, start = size + len(text.encode()), i + 1
            if size >= max_bytes:
                break
    return texts


def next_line_items(texts: list[str], n: int, seed: int = 0) -> list[dict]:
    """Up to n items: three lines of context, then the true next line or another line of the texts, in random order."""
    rng = random.Random(seed)
    lines = [line for t in texts for line in t.splitlines() if len(line.strip()) >= 16]
    items = []
    for text in texts:
        rows = [line for line in text.splitlines() if len(line.strip()) >= 16]
        for i in range(3, len(rows)):
            other = rng.choice(lines)
            if other == rows[i]:
                continue
            label = rng.randrange(2)
            choices = [other, rows[i]] if label else [rows[i], other]
            items.append({"context": "\n".join(rows[i - 3 : i]), "choices": choices, "label": label})
    rng.shuffle(items)
    return items[:n]


def main(run: Run, max_bytes: int = 40_000, items: int = 200) -> dict[str, float]:
    """Evaluate the run's newest checkpoint on its held-out split; metrics as eval/<task>.json and eval.json hold."""
    t0 = time.perf_counter()
    model, tokenizer = load_run(run.path)
    backend = Local(model, tokenizer, batch_size=8)
    texts = heldout_texts(run.file("data/val"), tokenizer, max_bytes)
    run.write_text("eval/heldout.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    run.write_text("eval/heldout_next_line.jsonl", "".join(json.dumps(x) + "\n" for x in next_line_items(texts, items)))
    model_id = str(latest_checkpoint(run.path))
    results = [
        evaluate(
            run,
            replace(load_task("perplexity"), format="jsonl"),
            backend,
            model_id,
            str(run.file("eval/heldout.jsonl")),
            None,
            None,
        ),
        evaluate(
            run, load_task("next_line"), backend, model_id, str(run.file("eval/heldout_next_line.jsonl")), None, 0
        ),
    ]
    write_summary(run, {"source": "speedrun held-out split", "max_bytes": max_bytes, "items": items}, results)
    metrics = {f"{r['task']}_{k}": v for r in results for k, v in r["metrics"].items()}
    return {**metrics, "eval_seconds": time.perf_counter() - t0}
