"""The reward model through `lmforge align method=rm`: on an easy preference its loss falls and its held-out
accuracy rises, load_score_model reads back the scores the run ended with, and a resumed run ends on them exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lmforge import cli
from lmforge.align.config import AlignDataConfig
from lmforge.align.pairs import load_pairs
from lmforge.align.reward_model import load_score_model
from lmforge.align.rm import held_out_accuracy, score_rows
from lmforge.run import Run

REPO = Path(__file__).parent.parent.parent


def easy_pairs(path: Path, n: int = 48) -> Path:
    rows = [
        {"prompt": f"What is {i} plus {i + 1}?", "chosen": f"The answer is {2 * i + 1}.", "rejected": "def f(x): pass"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_the_reward_model_learns_an_easy_preference_and_loads_back(tmp_path, tiny_run):
    data = easy_pairs(tmp_path / "easy.jsonl")
    args = ["align", "--config", str(REPO / "configs/align/rm.yaml"), f"policy={tiny_run}", f"data.path={data}"]
    args += ["data.format=pairs", "data.val_fraction=0.25", "train.steps=10", "train.batch_size=4", "train.lr=3e-3"]
    args += ["train.warmup_steps=0", "train.log_every=1", "train.eval_every=0", "train.device=cpu"]
    args += [f"run.root={tmp_path}", "run.name=rm", "peft.method=lora", "train.ckpt_every=5"]
    cli.main(args)
    run = Run(tmp_path / "rm")
    t = run.read_json("align.json")["training"]
    assert t["val_accuracy_after"] == 1.0 and t["val_accuracy_after"] > t["val_accuracy_before"]
    losses = [r["loss"] for r in run.read_metrics("align") if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1

    score, tokenizer = load_score_model(run.path)
    pairs = load_pairs(AlignDataConfig(path=str(data), format="pairs", val_fraction=0.25), tokenizer, 128).val
    assert held_out_accuracy(score, pairs, 4, tokenizer.pad_id, "cpu") == 1.0
    ids, lengths = score_rows(pairs[:2], tokenizer.pad_id)
    before = score.scores(ids, lengths)

    shutil.rmtree(run.path / "checkpoints/step_000010")  # as if the run had stopped after step 5
    cli.main(args + ["--resume"])
    again, _ = load_score_model(run.path)
    assert torch.equal(again.scores(ids, lengths), before)  # the head, optimizer and data order came back exactly
    assert (run.path / "adapter").is_dir()
