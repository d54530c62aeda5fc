"""Fine-tuning with activation checkpointing trains the same weights under the same names as without it."""

from pathlib import Path

import pytest
import torch

from lmforge.cli import run_stage

ALPACA = Path(__file__).parent.parent / "fixtures/alpaca_20.json"


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_recomputing_blocks_changes_nothing_but_memory(tmp_path, tiny_run, method):
    common = [f"base={tiny_run}", f"data.path={ALPACA}", f"run.root={tmp_path}", f"peft.method={method}",
              "train.steps=2", "train.batch_size=2", "train.lr=1e-2", "train.samples=0", "data.seq_len=96",
              "train.device=cpu"]  # fmt: skip
    plain = run_stage("finetune", None, [*common, "run.name=plain"])
    recomputed = run_stage("finetune", None, [*common, "run.name=ac", "train.activation_checkpointing=true"])
    assert recomputed["val_loss_after"] == pytest.approx(plain["val_loss_after"], rel=1e-6)
    folder = "checkpoints" if method == "lora" else "tuning"
    a, b = (torch.load(tmp_path / r / folder / "step_000002/finetune_state.pt", weights_only=True)["trainable"]
            for r in ("ac", "plain"))  # fmt: skip
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
