"""Checkpoint files: atomic layout, and the errors for a mismatched tokenizer or damaged files."""

import json

import pytest
import torch

from lmforge.checkpoint import checkpoint_dirs, load_model, load_run, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig, build_model


def test_vocabulary_mismatch_between_checkpoint_and_tokenizer(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path)
    save_checkpoint(tmp_path, 1, build_model(ModelConfig(vocab_size=600), seed=0), state={})
    with pytest.raises(LmforgeError, match=r"vocabulary \(600\) does not match .*tokenizer.json \(512\)"):
        load_run(tmp_path)


def test_round_trip_and_damaged_files(tmp_path):
    model = build_model(ModelConfig(vocab_size=64, tie_embeddings=True), seed=0)
    ckpt = save_checkpoint(tmp_path, 3, model, state={"note": "x"})
    loaded = load_model(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed.weight
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 3, "note": "x"}
    (ckpt / "model.json").write_text("{broken")
    with pytest.raises(LmforgeError, match="model.json is missing or corrupt"):
        load_model(tmp_path)
    (ckpt / "model.json").write_text(json.dumps({"vocab_size": 64, "dim": 48}))  # another shape than the weights
    with pytest.raises(LmforgeError, match="truncated or corrupt|does not fit"):
        load_model(tmp_path)


def test_interrupted_write_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, build_model(ModelConfig(vocab_size=64), seed=0), state={})
    (tmp_path / "checkpoints/.step_000002.tmp").mkdir()  # what a crash mid-write leaves
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]
    with pytest.raises(LmforgeError, match="no checkpoint"):
        load_model(tmp_path / "elsewhere")
