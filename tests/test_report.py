"""report.md renders every stage's summary of a run as its own section, a stage it has never seen included."""

import json
import os

from lmforge.report import write_report
from lmforge.run import Run

PRETRAIN = {
    "corpus": {"source": "stdlib", "train_tokens": 123456, "vocab_size": 384},
    "training": {"steps": 40, "val_loss": 4.25, "mfu": 0.0123, "train_seconds": 12.5},
    "compute": {"flops": 2.5e12, "energy_source": "estimate: 10 W per busy CPU core", "energy_kwh": 1.5e-5},
    "samples": [{"prompt": "def ", "completion": "f(x):\n    return x"}],
}
# a stage report.py was never told about: nested dicts, a list of records, a list of numbers
FINETUNE = {
    "dataset": {"name": "chat", "split": {"train": 900, "val": 100}},
    "epochs": [{"epoch": 1, "loss": 2.5}, {"epoch": 2, "loss": 2.0, "note": "a|b"}],
    "lora_ranks": [8, 16],
}


def make_run(tmp_path) -> Run:
    run = Run(tmp_path / "r")
    for stage, summary, mtime in (("pretrain", PRETRAIN, 1_000), ("finetune", FINETUNE, 2_000)):
        run.write_json(f"{stage}_config.json", {"run": {"name": "r"}})
        os.utime(run.file(f"{stage}_config.json"), (mtime, mtime))
        run.write_json(f"{stage}.json", summary)
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 6.0 - step})
        run.log_metrics({"step": step, "loss": 3.0 - step / 2}, stage="finetune")
    run.log_metrics({"step": 3, "val_loss": 2.5}, stage="finetune")
    # the tokenizer's files in transformers' layout: not a stage
    run.write_json("tokenizer.json", {"version": "1.0", "model": {}})
    run.write_json("tokenizer_config.json", {"model_max_length": 128})
    run.close()
    return run


def test_each_stage_gets_its_section_plot_and_tables(tmp_path):
    run = make_run(tmp_path)
    text = write_report(run.path).read_text()
    pretrain, finetune = text.split("## pretrain\n")[1].split("## finetune\n")  # in the order the stages ran
    assert "![pretrain loss curve](loss_curve.png)" in pretrain
    assert "### Corpus" in pretrain and "| train tokens | 123,456 |" in pretrain
    assert "| mfu | 1.2% |" in pretrain and "| val loss | 4.25 |" in pretrain
    assert "### Compute" in pretrain and "| energy source | estimate: 10 W per busy CPU core |" in pretrain
    assert "| flops | 2.500e+12 |" in pretrain
    assert "Prompt `'def '`:\n\n```\ndef f(x):\n    return x\n```" in pretrain
    assert "![finetune loss curve](finetune_loss_curve.png)" in finetune
    assert "### Dataset" in finetune and "| name | chat |" in finetune
    assert "#### Split" in finetune and "| train | 900 |" in finetune
    assert "| epoch | loss | note |" in finetune and "| 2 | 2 | a\\|b |" in finetune
    assert "| lora ranks | 8, 16 |" in finetune
    assert "tokenizer" not in text
    for plot in ("loss_curve.png", "finetune_loss_curve.png"):
        assert run.file(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_stage_that_only_logged_metrics_gets_its_plot(tmp_path):
    run = Run(tmp_path / "r")
    run.log_metrics({"step": 1, "loss": 1.0}, stage="align")
    run.close()
    text = write_report(run.path).read_text()
    assert "## align" in text and "![align loss curve](align_loss_curve.png)" in text
    assert json.loads(run.file("metrics.jsonl").read_text().splitlines()[0])["stage"] == "align"


def test_a_summary_without_a_config_gets_its_section_in_time_order(tmp_path):
    """pretrain's record of the prepared data it read (data.json) is a section, before the stage written after it."""
    run = Run(tmp_path / "r")
    run.write_json("data.json", {"stages": [{"stage": "dedup", "docs_in": 10, "docs_kept": 8}]})
    os.utime(run.file("data.json"), (1_000, 1_000))
    run.write_json("pretrain_config.json", {"run": {"name": "r"}})
    run.write_json("pretrain.json", PRETRAIN)
    run.write_json("special_tokens_map.json", {"bos_token": "<|bos|>"})
    run.close()
    text = write_report(run.path).read_text()
    data, pretrain = text.split("## data\n")[1].split("## pretrain\n")
    assert "| stage | docs in | docs kept |" in data and "| dedup | 10 | 8 |" in data
    assert "### Corpus" in pretrain and "special" not in text


def test_rewards_kl_and_accuracy_get_a_panel_each(tmp_path):
    run = Run(tmp_path / "r")
    run.write_json("align_config.json", {"run": {"name": "r"}})
    run.write_json("align.json", {"reward_before": 0.1, "reward_after": 0.9})
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 1.0 / step, "reward": step * 0.3, "kl": 0.01 * step}, stage="align")
    run.log_metrics({"step": 3, "val_accuracy": 0.7, "lr": 1e-5, "tokens_per_s": 10.0}, stage="align")
    run.close()
    text = write_report(run.path).read_text()
    assert "![align rewards, KL and accuracy](align_curves.png)" in text
    assert run.file("align_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pretrain = Run(tmp_path / "p")  # loss and lr alone: no second plot
    pretrain.log_metrics({"step": 1, "loss": 2.0, "lr": 1e-3})
    pretrain.close()
    assert "curves.png" not in write_report(pretrain.path).read_text()
