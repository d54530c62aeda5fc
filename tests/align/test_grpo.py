"""GRPO through the CLI on a tiny model: the summary, metrics and report it writes, a resumed run ending with the
weights of an uninterrupted one, and bad tasks or hanging checks counted (or exit 2) rather than crashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lmforge.align.config import AlignConfig
from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.config import load_config

CONFIG = Path(__file__).parents[2] / "configs/align/grpo.yaml"

SMALL = ["method=grpo", "grpo.task=arithmetic", "grpo.digits=1", "grpo.train_tasks=40", "grpo.eval_prompts=2",
         "rollout.prompts_per_step=2", "rollout.group_size=8", "rollout.max_new_tokens=12", "train.log_every=1",
         "train.batch_size=8", "train.lr=1e-2", "train.schedule=constant", "train.warmup_steps=0"]  # fmt: skip


def align(tmp_path, tiny_run, name, *overrides):
    main(["align", f"policy={tiny_run}", f"run.root={tmp_path}", f"run.name={name}", *SMALL, *overrides])
    return tmp_path / name


def test_the_config_loads(tiny_run):
    cfg = load_config(AlignConfig, str(CONFIG), [f"policy={tiny_run}"])
    assert cfg.method == "grpo" and cfg.grpo.task == "arithmetic" and cfg.peft.method == "lora"


def test_a_few_steps_write_summary_metrics_and_report(tmp_path, tiny_run):
    out = align(tmp_path, tiny_run, "g", "train.steps=2", "train.eval_every=1", "peft.method=lora", "grpo.beta=0.1")
    summary = json.loads((out / "align.json").read_text())
    assert [p["step"] for p in summary["held_out_curve"]] == [0, 1, 2]
    assert summary["training"]["steps"] == 2 and summary["tasks"] == {"train": 40, "held_out": 2, "rejected": {}}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(
        r["kl"] >= 0 and r["gen_s"] > 0 and 0 <= r["flat_groups"] <= 1 for r in steps
    )
    assert "## align" in (out / "report.md").read_text() and (out / "adapter/adapter_config.json").is_file()
    assert json.loads((out / "align_config.json").read_text())["method"] == "grpo"


def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, tiny_run):
    straight = align(tmp_path, tiny_run, "straight", "train.steps=2", "train.ckpt_every=1")
    align(tmp_path, tiny_run, "resumed", "train.steps=1")
    align(tmp_path, tiny_run, "resumed", "train.steps=2", "--resume")
    a, b = (safetensors.torch.load_file(tmp_path / r / "checkpoints/step_000002/model.safetensors")
            for r in ("straight", "resumed"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_model(tiny_run).state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # some group's rewards differed: the weights moved
    assert json.loads((straight / "align.json").read_text())["held_out_curve"][0]["step"] == 0


def test_bad_tasks_are_counted_hanging_checks_time_out(tmp_path, tiny_run, capsys):
    data = tmp_path / "tasks.jsonl"
    hang = {"tests": "while True:\n    pass\n"}
    rows = [{"prompt": f"Write f number {i}.", **hang} for i in range(30)] + [{"prompt": "no answer"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = align(tmp_path, tiny_run, "bad", "grpo.task=", f"data.path={data}", "data.format=tasks",
                "data.val_fraction=0.1", "grpo.checker=python", "grpo.timeout_s=1", "grpo.eval_prompts=1",
                "rollout.prompts_per_step=1", "rollout.group_size=2", "train.steps=1")  # fmt: skip
    summary = json.loads((out / "align.json").read_text())
    assert summary["tasks"]["rejected"] == {"no prompt or neither answer nor tests": 1}
    failed = summary["checker_failures"]
    assert sum(failed.values()) >= 2 and set(failed) <= {"timeout", "killed"}  # the wall clock or the CPU limit
    data.write_text(json.dumps({"prompt": "no answer"}) + "\n")
    with pytest.raises(SystemExit) as exit_:
        align(tmp_path, tiny_run, "none", "grpo.task=", f"data.path={data}", "data.format=tasks")
    assert exit_.value.code == 2 and "leaves 0 training" in capsys.readouterr().err
