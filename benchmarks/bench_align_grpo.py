"""GRPO speed: seconds per step (sampling the groups, scoring them, one update) of `lmforge align method=grpo`
against TRL's GRPOTrainer (transformers' generate on the CPU) on the transformers export of the same model, the same
arithmetic prompts, group size, max_new_tokens, temperature, loss (grpo, beta 0, one iteration) and precision (fp32).
A random-weight model almost never ends a reply early, so both sides sample replies of the same lengths (printed).
Prints both and the ratio; the issue's target is >= 3x.

    .venv/bin/python benchmarks/bench_align_grpo.py                       # depth 4, dim 256: a few minutes
    .venv/bin/python benchmarks/bench_align_grpo.py --steps 5 --prompts 8 --group 8 --max-new-tokens 64

The gain is in sampling: the engine batches every group's requests with a paged KV cache, shares the prompt's
prefix across the group and runs the C kernels, where generate() pads and decodes through the full torch model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.machine import set_threads  # noqa: E402
from lmforge.align import grpo  # noqa: E402
from lmforge.align.config import AlignConfig, AlignDataConfig, GrpoConfig, RolloutConfig  # noqa: E402
from lmforge.align.verifiable_tasks import generate_tasks  # noqa: E402
from lmforge.align.verifiers import Task, score  # noqa: E402
from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.finetune.config import SftTrainConfig  # noqa: E402
from lmforge.interop.hf import export_hf  # noqa: E402
from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.run import Run, RunConfig  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

LR = 1e-6


def make_base(root: Path, tasks: list[Task]) -> Path:
    """A speedrun-size LLaMA (4 layers, dim 256) with a BPE trained on the prompts, as a run."""
    texts = [t.prompt[-1]["content"] + " " + t.answer for t in tasks] * 4
    tokenizer = Tokenizer.train(texts, 2048)
    cfg = ModelConfig(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=704, max_seq_len=256)
    run = root / "base"
    tokenizer.save(run)
    save_checkpoint(run, 0, build_model(cfg, seed=0), state={})
    return run


def ours(base: Path, data: Path, root: Path, a) -> tuple[float, float]:
    cfg = AlignConfig(
        run=RunConfig(name="ours", root=str(root)),
        method="grpo",
        policy=str(base),
        data=AlignDataConfig(path=str(data), format="tasks", val_fraction=0.05),
        train=SftTrainConfig(steps=a.steps, batch_size=a.prompts * a.group, lr=LR, warmup_steps=0, log_every=1),
        rollout=RolloutConfig(prompts_per_step=a.prompts, group_size=a.group, max_new_tokens=a.max_new_tokens),
        grpo=GrpoConfig(checker="math", eval_prompts=1, instruction=""),
    )
    grpo.train(cfg, Run.from_config(cfg.run))
    rows = [r for r in Run(root / "ours").read_metrics() if "reply_tokens" in r]
    return steady([r["gen_s"] + r["update_s"] for r in rows]), sum(r["reply_tokens"] for r in rows) / len(rows)


def steady(seconds: list[float]) -> float:
    """Mean seconds per step without the first (both sides warm up there: kernels, allocator, caches)."""
    kept = seconds[1:] or seconds
    return sum(kept) / len(kept)


def trl(export: Path, tasks: list[Task], root: Path, a) -> tuple[float, float]:
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, answer, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score(texts, [Task([], x) for x in answer], "math", 5.0).rewards

    args = GRPOConfig(
        output_dir=str(root / "trl"),
        max_steps=a.steps,
        per_device_train_batch_size=a.prompts * a.group,
        num_generations=a.group,
        max_completion_length=a.max_new_tokens,
        temperature=1.0,
        beta=0.0,
        loss_type="grpo",
        learning_rate=LR,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    dataset = Dataset.from_list([{"prompt": t.prompt, "answer": t.answer} for t in tasks])
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "step_time" in h]  # generation, scoring and the update
    return steady([h["step_time"] for h in logged]), sum(h["completions/mean_length"] for h in logged) / len(logged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per side; the first is left out of the mean")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="replies per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument(
        "--policy", default="", help="a run to use instead of the random model (its replies may end early)"
    )
    a = parser.parse_args()
    threads = set_threads(a.threads or None)
    tasks = [t for split in ("train", "held_out") for t in generate_tasks("arithmetic", 40, split, 0, instruction="")]
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        root = Path(tmp)
        data = root / "tasks.jsonl"
        data.write_text("".join(json.dumps({"prompt": t.prompt, "answer": t.answer}) + "\n" for t in tasks))
        base = Path(a.policy) if a.policy else make_base(root, tasks)
        export = export_hf(base, root / "export")
        ours_s, ours_len = ours(base, data, root, a)
        trl_s, trl_len = trl(export, tasks, root, a)
    print(
        f"\nseconds per GRPO step: {a.prompts} prompts x {a.group} replies of up to {a.max_new_tokens} tokens, "
        f"mean of steps 2-{a.steps}, fp32, {threads} threads"
    )
    print(f"{'':<10}{'s/step':>10}{'reply tokens':>14}")
    print(f"{'lmforge':<10}{ours_s:>10.2f}{ours_len:>14.1f}")
    print(f"{'TRL':<10}{trl_s:>10.2f}{trl_len:>14.1f}")
    print(f"lmforge is {trl_s / ours_s:.2f}x faster")


if __name__ == "__main__":
    main()
