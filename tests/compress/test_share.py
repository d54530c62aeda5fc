"""Cross-layer weight sharing: shared layers are one set of modules (fewer parameters) after a round trip through
the compressed checkpoint, the logits survive it and a cached decode still equals a full forward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmforge.checkpoint import load_run
from lmforge.cli import main
from lmforge.compress.share import SharedBlock, groups_of, share_layers
from lmforge.models import ModelConfig, build_model
from lmforge.sampling import generate_tokens


def test_groups_are_consecutive_runs_and_the_mean_starts_each():
    assert groups_of(5, 2) == [[0, 1, 2], [3, 4]] and groups_of(4, 4) == [[0], [1], [2], [3]]
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=2, hidden_dim=64, max_seq_len=32)
    model = build_model(cfg, seed=0)
    before = [layer.mlp.down.weight.detach().clone() for layer in model.layers]
    share_layers(model, 2, init="mean")
    assert torch.allclose(model.layers[0].mlp.down.weight, (before[0] + before[1]) / 2)
    assert model.layers[3].mlp.down is model.layers[2].mlp.down and model.layers[1].attn is not model.layers[0].attn


def test_shared_run_loads_back_as_one_set_of_modules(tmp_path, tiny_run, tiny_text, compress_tiny):
    base, tokenizer = load_run(tiny_run)
    overrides = ["method=share", "share.groups=1", "share.recover_steps=4", "train.lr=1e-3"]
    result, path = compress_tiny(tmp_path, tiny_run, tiny_text, *overrides)
    assert result.summary["recover_held_out_after"] < result.summary["recover_held_out_before"]
    model, _ = load_run(path)
    assert isinstance(model.layers[1], SharedBlock) and model.layers[1].attn.layer == 1
    for name in ("attn_norm", "mlp_norm", "mlp", "attn.qkv", "attn.proj"):
        assert model.layers[1].get_submodule(name) is model.layers[0].get_submodule(name)
    assert model.num_params() == result.model.num_params() < base.num_params()
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(model(idx), result.model(idx))
    # each layer keeps its own KV-cache slot: a cached greedy decode equals greedy decoding by full forwards
    prompt = tokenizer.encode("def main():")
    cached = list(generate_tokens(model, prompt, 8))
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt) :]
    # a fresh process that never imported the methods still knows the "shared" kind
    check = f"from lmforge.checkpoint import load_run; m, _ = load_run({str(path)!r}); print(m.layers[1].mlp is "
    check += "m.layers[0].mlp)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_more_groups_than_layers_exits_2_before_writing(tmp_path, tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(tiny_run), "method=share", "share.groups=3", f"run.root={tmp_path}"])
    assert exit_.value.code == 2 and "share.groups=3" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("metrics.jsonl"))
