"""The shared training steps: a validation loss that weighs every token of one fixed set once, however the batches
and ranks split it."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.data import Document, eval_batches, write_shards
from lmforge.models import ModelConfig, build_model
from lmforge.train.steps import autocast_for, evaluate

CFG = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
SEQ = 16


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory, tiny_text, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("val")
    write_shards([Document(str(i), tiny_text[i * 500 : (i + 1) * 500]) for i in range(6)], tiny_tokenizer, out)
    return out


def reference_loss(val_dir: Path, windows: int) -> float:
    """The mean token loss of the first `windows` windows, in one forward."""
    x, y = next(eval_batches(val_dir, SEQ, windows, 1))
    with torch.no_grad():
        return build_model(CFG, seed=0).eval()(x, y).item()


@pytest.mark.parametrize(("batch_size", "batches"), [(9, 1), (3, 3), (1, 9)])
def test_one_process_loss_does_not_depend_on_the_batching(val_dir, batch_size, batches):
    model = build_model(CFG, seed=0)
    loss = evaluate(model, val_dir, SEQ, batch_size, batches, autocast_for(torch.device("cpu"), "fp32"))
    assert loss == pytest.approx(reference_loss(val_dir, 9), rel=1e-6)
    assert model.training  # put back as it was


def test_ranks_with_uneven_shares_of_an_fsdp_model_agree_with_one_process(val_dir, tmp_path, launcher):
    returncode, output = launcher([str(Path(__file__).with_name("eval_worker.py")), str(val_dir), str(tmp_path)], 2)
    assert returncode == 0, output[-6000:]
    losses = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert losses[0] == losses[1] == pytest.approx(reference_loss(val_dir, 9), rel=1e-6)
