"""Multiple-choice evaluation speed: lmforge's shared-prefix scoring (each context once, its endings beside it in one
forward pass) against lm-evaluation-harness 0.4's `hf` model on the transformers export of the same weights, on
HellaSwag dev and MMLU-Redux dev, with the same batch size and threads. Prints items/s, the ratio and both accuracies.

    .venv/bin/python benchmarks/bench_eval.py                  # depth 4, dim 256, vocab 8192, random init, ~2 min
    .venv/bin/python benchmarks/bench_eval.py --run runs/speedrun --threads 1

Without --run the model is a speedrun-size Llama (4 layers, dim 256, vocab 8192, a 2048-token context so that no
5-shot prompt is cut) with random weights and a BPE
tokenizer trained on WikiText-2 validation; accuracies are then chance, and equal between the two when the scores are.
lm-eval's hf model already computes a context once when every ending is one token (MMLU's " A".." D"), so 0-shot MMLU
gains only the head and softmax over context positions; 5-shot gains the five examples, computed once for all items.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.machine import require_data, set_threads  # noqa: E402
from lmforge.checkpoint import load_run, save_checkpoint  # noqa: E402
from lmforge.eval.backends import Local  # noqa: E402
from lmforge.eval.families import multiple_choice  # noqa: E402
from lmforge.eval.tasks import few_shot_prefix, load_task, read_items  # noqa: E402
from lmforge.interop.hf import export_hf  # noqa: E402
from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

DATA = Path("../shared/data")
ROUND = 64  # items per alternating round
# (task, shots, data): MMLU is usually run 5-shot, where every item's context starts with the same five examples
TASKS = [
    ("hellaswag", 0, DATA / "mc/hellaswag_val_dev200.jsonl"),
    ("mmlu", 0, DATA / "mc/mmlu_redux_dev.jsonl"),
    ("mmlu", 5, DATA / "mc/mmlu_redux_dev.jsonl"),
]


def speedrun_size_run(folder: Path) -> Path:
    text = require_data(DATA / "pretrain/wikitext2_valid.txt").read_text()
    tokenizer = Tokenizer.train([text[i : i + 4000] for i in range(0, len(text), 4000)], vocab_size=8192)
    tokenizer.save(folder)
    cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=704, max_seq_len=2048)
    save_checkpoint(folder, 0, build_model(cfg, seed=0), state={})
    return folder


def accuracy(lls: list[list[float]], choices: list[list[str]], gold: list[int]) -> tuple[float, float]:
    acc = norm = 0
    for scores, texts, g in zip(lls, choices, gold, strict=True):
        acc += max(range(len(scores)), key=scores.__getitem__) == g
        normed = [s / len(t) for s, t in zip(scores, texts, strict=True)]
        norm += max(range(len(normed)), key=normed.__getitem__) == g
    return acc / len(gold), norm / len(gold)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run folder (default: a random speedrun-size model)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    args = p.parse_args()
    for _, _, path in TASKS:
        require_data(path)
    threads = set_threads(args.threads)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else speedrun_size_run(Path(tmp) / "run")
        model, tokenizer = load_run(run)
        hf = HFLM(pretrained=str(export_hf(run, Path(tmp) / "hf")), batch_size=args.batch_size, device="cpu",
                  dtype="float32")  # fmt: skip
        print(f"model {model.num_params() / 1e6:.1f}M params, batch {args.batch_size}, {threads} threads")
        print(f"{'task':<16} {'items':>5} {'lmforge it/s':>12} {'lm-eval hf it/s':>15} {'ratio':>6}  acc (ours/hf)  "
              "acc_norm (ours/hf)")  # fmt: skip
        warm = [Instance("loglikelihood", {}, ("a b c", " d"), idx=0)]
        hf.loglikelihood(warm, disable_tqdm=True)  # first calls allocate and pick kernels: not timed, for either
        Local(model, tokenizer).loglikelihood([("a b c", [" d", " e"])])
        for name, shots, path in TASKS:
            task = load_task(name)
            pool = read_items(task, path)
            items = pool[: args.limit]
            contexts = [
                few_shot_prefix(task, pool, i, shots) + task.render(task.prompt, x) for i, x in enumerate(items)
            ]
            choices = [[str(c) for c in task.value(task.choices, x)] for x in items]
            gold = [int(task.value(task.answer, x)) for x in items]
            # alternate rounds of ROUND items, ours then theirs, so that load from other processes hits both
            local, samples, hf_lls, ours_s, hf_s = Local(model, tokenizer, args.batch_size), [], [], 0.0, 0.0
            for start in range(0, len(items), ROUND):
                batch = list(enumerate(items))[start : start + ROUND]
                t0 = time.perf_counter()
                samples += multiple_choice(task, local, batch, pool, shots)
                ours_s += time.perf_counter() - t0
                requests = [(contexts[i], " " + e) for i, _ in batch for e in choices[i]]
                instances = [Instance("loglikelihood", {}, r, idx=n) for n, r in enumerate(requests)]
                t0 = time.perf_counter()
                flat = [lp for lp, _ in hf.loglikelihood(instances, disable_tqdm=True)]
                hf_s += time.perf_counter() - t0
                for i, _ in batch:
                    hf_lls.append(flat[: len(choices[i])])
                    flat = flat[len(choices[i]) :]
            ours = accuracy([s["lls"] for s in samples], choices, gold)
            theirs = accuracy(hf_lls, choices, gold)
            rates = f"{len(items) / ours_s:>12.1f} {len(items) / hf_s:>15.1f} {hf_s / ours_s:>5.2f}x"
            accs = f"{ours[0]:.3f}/{theirs[0]:.3f}    {ours[1]:.3f}/{theirs[1]:.3f}"
            print(f"{f'{name} {shots}-shot':<16} {len(items):>5} {rates}  {accs}")


if __name__ == "__main__":
    main()
