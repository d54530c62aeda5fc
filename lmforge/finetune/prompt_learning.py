"""Prompt learning for classification, the survey's four strategies (Liu et al., 2021, "Pre-train, Prompt, and
Predict"): a template turns an input into a cloze text and a verbalizer names one label word per class, scored by the
LM; then what trains differs. Tuning-free prompting trains nothing; fixed-LM prompt tuning trains a soft prompt before
the template (Lester et al., 2021) with the LM frozen; fixed-prompt LM tuning trains the LM under the fixed template
(PET, Schick & Schuetze, 2021); prompt+LM tuning trains both.

Run: `python -m lmforge.finetune.prompt_learning RUN --data sst2_dev.tsv [--steps 40]` (results in
RUN/prompt_learning.json, a section of its report).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.finetune.methods import PeftConfig, Tuned, tune
from lmforge.run import Run, resolve_run


@dataclass
class Verbalizer:
    template: str = "{text} All in all, it was"
    """The cloze text; {text} is the input, the label word follows it."""
    words: list[str] = field(default_factory=lambda: [" terrible", " great"])
    """One word per class, in label order (SST-2: 0 negative, 1 positive)."""


# strategy -> (peft method, whether the LM's own weights train)
STRATEGIES = {
    "tuning_free": ("full", False),
    "fixed_lm_prompt_tuning": ("prompt", False),
    "fixed_prompt_lm_tuning": ("full", True),
    "prompt_lm_tuning": ("prompt", True),
}


def read_examples(path: str | Path) -> list[tuple[str, int]]:
    """(text, label) pairs from a GLUE-style TSV (sentence, label) or JSONL {text, label}."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; give a TSV (sentence<TAB>label) or JSONL ({{text, label}}) file")
    if path.suffix == ".tsv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        pairs = [(r.get("sentence", "").strip(), r.get("label", "")) for r in rows]
    else:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        pairs = [(str(r.get("text", "")).strip(), r.get("label", "")) for r in records]
    try:
        examples = [(text, int(label)) for text, label in pairs if text]
    except ValueError:
        raise LmforgeError(f"{path}: every label must be an integer class index") from None
    if not examples:
        raise LmforgeError(f"{path} holds no examples; it needs sentence/text and label fields")
    return examples


def encode(tokenizer, verbalizer: Verbalizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (text, label word) pair as one right-padded row: ids (N*K, T), the positions whose logits predict the
    word's tokens (N*K, T) as a mask, and the word's token ids there (N*K, T), -100 elsewhere."""
    words = [tokenizer.encode_plain(w) for w in verbalizer.words]
    rows, targets = [], []
    for text in texts:
        prompt = tokenizer.encode(verbalizer.template.format(text=text), bos=True)
        for word in words:
            rows.append(prompt + word)
            targets.append([-100] * (len(prompt) - 1) + word + [-100])
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_id)
    y = torch.full((len(rows), T), -100)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        y[i, : len(target)] = torch.tensor(target)
    return ids, y, y != -100


def label_scores(tuned: Tuned, ids: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, K: int) -> torch.Tensor:
    """(N, K) log-likelihood of each class's label word after its cloze text."""
    logp = F.log_softmax(tuned.logits(ids).float(), dim=-1)  # (N*K, T, V)
    token = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * mask  # (N*K, T)
    return token.sum(-1).view(-1, K)


@torch.no_grad()
def accuracy(tuned: Tuned, tokenizer, verbalizer: Verbalizer, examples, batch: int = 16) -> float:
    was_training = tuned.training
    tuned.eval()
    right = 0
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        scores = label_scores(tuned, *encode(tokenizer, verbalizer, [t for t, _ in chunk]), len(verbalizer.words))
        right += sum(int(p == label) for p, (_, label) in zip(scores.argmax(-1).tolist(), chunk, strict=True))
    tuned.train(was_training)
    return right / len(examples)


def prepare(model, strategy: str, virtual_tokens: int) -> Tuned:
    method, lm_trains = STRATEGIES[strategy]
    tuned = tune(model, PeftConfig(method=method, virtual_tokens=virtual_tokens))
    model.requires_grad_(lm_trains)
    return tuned


def train(tuned: Tuned, tokenizer, verbalizer: Verbalizer, examples, steps: int, batch: int, lr: dict, seed: int):
    """Cross-entropy over the label words' scores (the verbalizer as a classifier head), AdamW, `steps` batches; a
    soft prompt trains at lr["prompt"], the LM's weights at lr["lm"] (a soft prompt needs a rate ~1000x higher)."""
    own = {id(p) for p in tuned.model.parameters()}
    params = [p for p in tuned.parameters() if p.requires_grad]
    if not params or not steps:
        return []
    groups = [
        {"params": [p for p in params if id(p) not in own], "lr": lr["prompt"]},
        {"params": [p for p in params if id(p) in own], "lr": lr["lm"]},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    order = random.Random(seed)
    losses = []
    tuned.train()
    for _ in range(steps):
        chunk = order.sample(examples, min(batch, len(examples)))
        scores = label_scores(tuned, *encode(tokenizer, verbalizer, [t for t, _ in chunk]), len(verbalizer.words))
        loss = F.cross_entropy(scores, torch.tensor([label for _, label in chunk]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def compare(run_dir, examples, verbalizer: Verbalizer, steps: int, batch: int, lr: dict[str, float], seed: int = 0):
    """Accuracy of every strategy on a held-out half, before and after training on the other half."""
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    half = len(shuffled) // 2
    train_set, test_set = shuffled[:half], shuffled[half:]
    rows = []
    for strategy in STRATEGIES:
        model, tokenizer = load_run(run_dir)
        torch.manual_seed(seed)
        tuned = prepare(model, strategy, virtual_tokens=8)
        before = accuracy(tuned, tokenizer, verbalizer, test_set)
        t0 = time.perf_counter()
        losses = train(tuned, tokenizer, verbalizer, train_set, steps, batch, lr, seed)
        seconds = time.perf_counter() - t0
        trainable, total = tuned.num_trainable()
        after = accuracy(tuned, tokenizer, verbalizer, test_set)
        rows.append(
            dict(strategy=strategy, accuracy_before=before, accuracy_after=after, trainable_params=trainable,
                 trainable_share=trainable / total, train_seconds=seconds, final_loss=losses[-1] if losses else None)
        )  # fmt: skip
        print(
            f"{strategy:<24} accuracy {before:.3f} -> {after:.3f} | {trainable:,} trained | {seconds:.0f}s", flush=True
        )
    return {"train_examples": len(train_set), "test_examples": len(test_set), "strategies": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (or name under runs/) whose model is prompted")
    parser.add_argument("--data", required=True, help="TSV (sentence, label) or JSONL {text, label}")
    parser.add_argument("--limit", type=int, default=400, help="examples used (half train, half test)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lm-lr", type=float, default=2e-5, help="learning rate where the LM's weights train")
    parser.add_argument("--prompt-lr", type=float, default=3e-2, help="learning rate of a soft prompt alone")
    args = parser.parse_args(argv)
    run_dir = resolve_run(args.run)
    examples = read_examples(args.data)[: args.limit]
    verbalizer = Verbalizer()
    result = compare(
        run_dir, examples, verbalizer, args.steps, args.batch, {"lm": args.lm_lr, "prompt": args.prompt_lr}
    )
    result = {"data": str(args.data), "verbalizer": asdict(verbalizer), "steps": args.steps, **result}
    Run(run_dir).write_json("prompt_learning.json", result)
    return result


if __name__ == "__main__":
    try:
        main()
    except LmforgeError as e:
        raise SystemExit(f"prompt_learning: error: {e}") from None
