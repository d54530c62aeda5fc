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


def test_recomputed_blocks_keep_far_less_for_backward(make_base):
    from lmforge.finetune.memory import recompute_blocks
    from lmforge.train.parallel import saved_activation_bytes

    model, x = make_base(n_layers=4), torch.randint(0, 256, (4, 64))
    kept = saved_activation_bytes(model, x, x)
    names = [n for n, _ in model.named_parameters()]
    recompute_blocks(model)
    assert saved_activation_bytes(model, x, x) < kept / 4 and [n for n, _ in model.named_parameters()] == names
