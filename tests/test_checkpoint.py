"""Checkpoint files: atomic layout, and the errors for a mismatched tokenizer or damaged files."""

import json
import shutil
import subprocess
import sys

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


TINY = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


@pytest.mark.parametrize(
    "tampered, message",
    [
        (dict(n_layers=10**9), "says n_layers=1000000000, they hold 2 layers"),
        (dict(n_layers=1), "says n_layers=1, they hold 2 layers"),
        (dict(dim=10**12, n_heads=4), r"makes embed.weight \[64, 1000000000000\], they hold \[64, 32\]"),
        (dict(vocab_size=10**12), r"makes embed.weight \[1000000000000, 32\]"),
        (dict(hidden_dim=10**18), "describes tensors too large to exist"),
        (dict(hidden_dim=10**9), r"makes layers.0.mlp.gate_up.weight \[2000000000, 32\], they hold \[128, 32\]"),
        (dict(n_kv_heads=4), r"makes layers.0.attn.qkv.weight \[96, 32\], they hold \[64, 32\]"),
        (dict(max_seq_len=10**9), "max_seq_len=1000000000 needs 16,000,000,000 numbers of position tables"),
        (dict(pos="learned"), "needs a tensor positions.wpe.weight that they lack"),
        (dict(mlp="gelu"), "needs a tensor layers.0.mlp.up.weight that they lack"),
    ],
)
def test_a_model_json_that_does_not_fit_its_weights_is_refused_before_building(tmp_path, tampered, message):
    ckpt = save_checkpoint(tmp_path, 1, build_model(ModelConfig(**TINY), seed=0), state={})
    (ckpt / "model.json").write_text(json.dumps({**TINY, **tampered}))
    with pytest.raises(LmforgeError, match=rf"model.json does not fit its weights: .*{message}"):
        load_model(tmp_path)


def test_weights_beyond_the_config_and_a_longer_context_still_load(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, build_model(ModelConfig(**TINY, pos="learned"), seed=0), state={})
    (ckpt / "model.json").write_text(json.dumps({**TINY, "pos": "rope"}))
    with pytest.raises(LmforgeError, match=r"they hold tensors it has no place for \(positions.wpe.weight\)"):
        load_model(tmp_path)
    ckpt = save_checkpoint(tmp_path, 2, build_model(ModelConfig(**TINY), seed=0), state={})
    (ckpt / "model.json").write_text(json.dumps({**TINY, "max_seq_len": 4096}))  # RoPE runs past its training length
    assert load_model(tmp_path).cfg.max_seq_len == 4096


def test_generate_on_a_huge_model_json_exits_2_at_once(tiny_run, tmp_path):
    """The reported case: n_layers=10**9 made generate build layers for minutes."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    model_json = next((run / "checkpoints").glob("step_*")) / "model.json"
    model_json.write_text(json.dumps({**json.loads(model_json.read_text()), "n_layers": 10**9}))
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "generate", str(run), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "n_layers=1000000000, they hold 2 layers" in lines[0], lines
