"""The pre-training loop end to end on a tiny corpus: exact resume, artifacts, learning, and bad input."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import checkpoint_dirs, load_run
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig, build_model
from lmforge.report import write_report
from lmforge.run import Run
from lmforge.train import pretrain
from lmforge.train.config import TrainConfig
from lmforge.train.dcp import dcp_dirs
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import ParallelConfig, checkpoint_blocks, saved_activation_bytes
from lmforge.train.schedule import build_schedulers
from lmforge.train.steps import optimizer_step

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
    assert [p.name for p in dcp_dirs(tmp_path / "split")] == ["step_000004", "step_000008"]
    shutil.rmtree(final[-1])
    shutil.rmtree(dcp_dirs(tmp_path / "split")[-1])
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
    lineage = json.loads((checkpoint_dirs(run)[-1] / "data_lineage.json").read_text())
    assert lineage["source"] == str(corpus) and lineage["tokenizer_sha256"] == tokenizer.sha256
    written = json.loads((run / "pretrain.json").read_text())
    samples = written["samples"]
    assert len(samples) == 3 and all(isinstance(s["completion"], str) for s in samples)
    compute = written["compute"]
    assert compute["flops"] == written["training"]["total_flops"] == 40 * 4 * 32 * written["model"]["flops_per_token"]
    assert compute["device"] == "cpu" and compute["ranks"] == 1 and compute["device_seconds"] > 0
    assert compute["energy_kwh"] > 0 and compute["energy_source"].startswith(("estimate", "RAPL"))
    assert compute["co2_g"] == pytest.approx(compute["energy_kwh"] * compute["grid_g_co2_per_kwh"])
    report = write_report(run).read_text()
    assert "### Compute" in report and f"| energy source | {compute['energy_source']} |" in report
    assert "![pretrain loss curve](loss_curve.png)" in report and "Prompt `" in report


def test_keep_last_deletes_old_checkpoints(tmp_path, corpus):
    run_pretrain(tmp_path, corpus, "train.steps=6", "train.ckpt_every=1", "train.keep_last=2", "train.eval_every=0")
    assert [p.name for p in checkpoint_dirs(tmp_path / "r")] == ["step_000005", "step_000006"]
    assert [p.name for p in dcp_dirs(tmp_path / "r")] == ["step_000005", "step_000006"]
    assert not list((tmp_path / "r/checkpoints").glob(".*tmp")) and not list((tmp_path / "r/dcp").glob(".*tmp"))


def test_bf16_activation_checkpointing_and_wsd_train(tmp_path, corpus):
    summary = run_pretrain(
        tmp_path,
        corpus,
        "train.steps=4",
        "train.dtype=bf16",
        "train.activation_checkpointing=full",
        "train.schedule=wsd",
        "train.eval_every=0",
    )
    assert summary["steps"] == 4 and summary["train_loss"] == summary["train_loss"]  # not NaN
    # every block recomputed: only the blocks' inputs stay, several times less than without checkpointing
    assert 0 < summary["activation_bytes"] < summary["activation_bytes_without_ac"] / 3
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
    metadata = tmp_path / "r/dcp/step_000002/.metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    with pytest.raises(LmforgeError, match="is not a complete DCP checkpoint"):
        run_pretrain(tmp_path, corpus, "train.steps=4", resume=True)


def test_a_save_cut_short_leaves_the_last_complete_checkpoint_to_resume(tmp_path, corpus):
    """A crash while every rank writes its shards leaves a .step_N.tmp folder; resume ignores it."""
    common = ["train.steps=4", "train.ckpt_every=2", "train.eval_every=0", "sample.prompts=[]"]
    run_pretrain(tmp_path, corpus, *common, name="straight")
    run_pretrain(tmp_path, corpus, *common, name="cut")
    run_dir = tmp_path / "cut"
    shutil.rmtree(run_dir / "checkpoints/step_000004")
    (run_dir / "dcp/step_000004").rename(run_dir / "dcp/.step_000004.tmp")
    (run_dir / "dcp/.step_000004.tmp/.metadata").unlink()  # DCP writes its index last
    run_pretrain(tmp_path, corpus, *common, name="cut", resume=True)
    a = load_file(tmp_path / "straight/checkpoints/step_000004/model.safetensors")
    b = load_file(run_dir / "checkpoints/step_000004/model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key


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


TINY_CFG = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)


def test_fp16_scaler_skips_a_step_with_an_inf_gradient_then_learns():
    torch.manual_seed(0)
    model = build_model(TINY_CFG, seed=0)
    tc = TrainConfig(steps=12, lr=1e-2, warmup_steps=1)
    optimizers = build_optimizers(model, tc)
    schedulers = build_schedulers(optimizers, tc)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))

    def backward() -> float:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        scaler.scale(loss).backward()
        return loss.item()

    backward()
    model.embed.weight.grad[3, 5] = math.inf  # an overflow in one element of one gradient
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_step(model, optimizers, schedulers, scaler, 1.0, ParallelConfig(), None)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the step was skipped ...
    # ... fused AdamW took the scaler's found-inf flag: no step counted, no moments; and the scale halved
    assert all(float(state["step"]) == 0 and not state["exp_avg"].any() for state in optimizers[0].state.values())
    assert scaler.get_scale() == 2.0**9
    model.zero_grad(set_to_none=True)
    losses = []
    for _ in range(10):
        losses.append(backward())
        optimizer_step(model, optimizers, schedulers, scaler, 1.0, ParallelConfig(), None)
        model.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.5
    assert scaler.get_scale() == 2.0**9  # no further overflow, and growth waits 2000 clean steps
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_fp16_training_logs_the_loss_scale_and_learns(tmp_path, corpus):
    common = ["train.steps=30", "train.lr=0.01", "train.eval_every=0", "sample.prompts=[]"]
    summary = run_pretrain(tmp_path, corpus, *common, "train.dtype=fp16")
    rows = [r for r in Run(tmp_path / "r").read_metrics() if "loss" in r]
    assert all(r["loss_scale"] > 0 for r in rows)
    assert summary["train_loss"] < rows[0]["loss"] - 1.0


def test_selective_checkpointing_saves_part_of_what_full_saves_with_the_same_gradients():
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    saved, grads = {}, {}
    for policy, every in [("none", 1), ("selective", 2), ("full", 1)]:
        model = build_model(TINY_CFG, seed=0)
        checkpoint_blocks(model, policy, every)
        saved[policy] = saved_activation_bytes(model, x, y)
        model(x, y).backward()
        grads[policy] = [p.grad for p in model.parameters()]
    assert saved["full"] < saved["selective"] < saved["none"]
    # 2 of 4 identical blocks checkpointed: half of full checkpointing's saving
    assert saved["none"] - saved["selective"] == pytest.approx((saved["none"] - saved["full"]) / 2, rel=0.05)
    for policy in ("selective", "full"):
        for a, b in zip(grads[policy], grads["none"], strict=True):
            assert torch.equal(a, b)  # recomputation repeats the same kernels
