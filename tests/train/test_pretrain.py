"""The pre-training loop end to end on a tiny corpus: exact resume, artifacts, learning, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import checkpoint_dirs, load_run
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.run import Run
from lmforge.train import pretrain

TINY = [
    "model.vocab_size=384",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.hidden_dim=64",
    "model.max_seq_len=32",
    "train.batch_size=4",
    "train.eval_batches=2",
    "train.log_every=2",
    "train.warmup_steps=2",
    "sample.max_new_tokens=8",
]


def run_pretrain(root: Path, corpus: Path, *overrides: str, name: str = "r", resume: bool = False) -> dict:
    cfg = load_config(
        pretrain.PretrainConfig,
        None,
        [*TINY, f"data.path={corpus}", f"run.root={root}", f"run.name={name}", *overrides],
    )
    cfg.resume = resume
    return pretrain.main(cfg, Run.from_config(cfg.run))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical(tmp_path, corpus, optimizer):
    common = [f"train.optimizer={optimizer}", "model.dropout=0.1", "train.grad_accum=2", "train.eval_every=0"]
    run_pretrain(tmp_path, corpus, *common, "train.steps=8", name="straight")
    run_pretrain(tmp_path, corpus, *common, "train.steps=8", "train.ckpt_every=4", "train.keep_last=5", name="split")
    # drop the final checkpoint of the split run and continue from step 4, as after a crash
    final = checkpoint_dirs(tmp_path / "split")
    assert [p.name for p in final] == ["step_000004", "step_000008"]
    import shutil

    shutil.rmtree(final[-1])
    run_pretrain(tmp_path, corpus, *common, "train.steps=8", "train.ckpt_every=4", name="split", resume=True)
    a = load_file(tmp_path / "straight/checkpoints/step_000008/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/step_000008/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_folder_holds_every_artifact_and_the_model_learns(tmp_path, corpus):
    summary = run_pretrain(tmp_path, corpus, "train.steps=40", "train.lr=0.01", "train.eval_every=20")
    run = tmp_path / "r"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "tokens_per_s", "mfu"} <= train_rows[0].keys()
    assert summary["val_loss"] < train_rows[0]["loss"] - 1.0  # from ln(384) = 5.95 to below 4.95
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert summary["steps"] == 40 and summary["tokens_trained"] == 40 * 4 * 32
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("tokenizer.json", "pretrain.json", "pretrain_config.json", "data/train/manifest.json"):
        assert (run / name).is_file(), name
    model, tokenizer = load_run(run)
    assert model.cfg.vocab_size == tokenizer.vocab_size == 384
    samples = json.loads((run / "pretrain.json").read_text())["samples"]
    assert len(samples) == 3 and all(isinstance(s["completion"], str) for s in samples)


def test_keep_last_deletes_old_checkpoints(tmp_path, corpus):
    run_pretrain(tmp_path, corpus, "train.steps=6", "train.ckpt_every=1", "train.keep_last=2", "train.eval_every=0")
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")] == ["step_000005", "step_000006"]
    assert not list((tmp_path / "r/checkpoints").glob(".*tmp"))


def test_bf16_activation_checkpointing_and_wsd_train(tmp_path, corpus):
    summary = run_pretrain(
        tmp_path,
        corpus,
        "train.steps=4",
        "train.dtype=bf16",
        "train.activation_checkpointing=true",
        "train.schedule=wsd",
        "train.eval_every=0",
    )
    assert summary["steps"] == 4 and summary["train_loss"] == summary["train_loss"]  # not NaN
    model, _ = load_run(tmp_path / "r")  # the checkpoint keeps plain names despite the wrappers
    assert "layers.0.attn.qkv.weight" in model.state_dict()


def test_resume_without_checkpoint_and_corrupt_checkpoint(tmp_path, corpus):
    with pytest.raises(LmforgeError, match="holds no checkpoint"):
        run_pretrain(tmp_path, corpus, "train.steps=2", resume=True)
    run_pretrain(tmp_path, corpus, "train.steps=2", "train.eval_every=0")
    weights = tmp_path / "r/checkpoints/step_000002/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LmforgeError, match="truncated or corrupt"):
        load_run(tmp_path / "r")
    with pytest.raises(LmforgeError, match="truncated or corrupt"):
        run_pretrain(tmp_path, corpus, "train.steps=4", resume=True)


def test_tokenizer_of_another_vocab_size_is_refused(tmp_path, corpus):
    run_pretrain(tmp_path, corpus, "train.steps=1", "train.eval_every=0")
    with pytest.raises(LmforgeError, match="model.vocab_size=384"):
        run_pretrain(tmp_path, corpus, "train.steps=1", "model.vocab_size=400")


def test_corpus_smaller_than_a_window(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("tiny " * 30)
    (small / "b.txt").write_text("text " * 30)
    with pytest.raises(LmforgeError, match="window"):
        run_pretrain(tmp_path, small, "train.steps=1", "model.max_seq_len=512")


def test_compiled_training_matches_eager(tmp_path, corpus):
    """train.compile=true (inductor, ~30 s to compile here) trains the same weights as eager, up to float rounding."""
    common = ["train.steps=2", "train.eval_every=0", "sample.prompts=[]"]
    run_pretrain(tmp_path, corpus, *common, name="eager")
    run_pretrain(tmp_path, corpus, *common, "train.compile=true", name="compiled")
    a = load_file(tmp_path / "eager/checkpoints/step_000002/model.safetensors")
    b = load_file(tmp_path / "compiled/checkpoints/step_000002/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
