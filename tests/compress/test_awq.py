"""AWQ: folding the scales leaves the float model's outputs unchanged (every norm, MLP and attention variant), the
scaled model rounds with less output error than plain round to nearest, and a run saves and loads back."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmforge import cli
from lmforge.checkpoint import load_run
from lmforge.compress import awq, rtn
from lmforge.compress.calibration import block_inputs, run_blocks
from lmforge.compress.config import QuantConfig
from lmforge.compress.modules import QuantLinear
from lmforge.models import ModelConfig, build_model

TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)


def tiny_model(seed: int = 0, **overrides):
    """Random weights everywhere, with a few input channels of every block made salient (large activations), the
    case AWQ is for."""
    model = build_model(ModelConfig(**(TINY | overrides)), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for block in model.layers:
            block.attn_norm.weight[:4] *= 8
            block.mlp_norm.weight[4:8] *= 8
    return model.eval()


def windows(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "variant",
    [{}, {"n_kv_heads": 4}, {"mlp": "gelu", "norm": "layernorm", "bias": True, "pos": "learned"}],
    ids=["gqa-swiglu", "mha-swiglu", "gelu-layernorm"],
)
def test_folded_scales_keep_float_outputs(variant):
    model = tiny_model(**variant)
    ids = windows()
    before = model(ids)
    norms = [b.attn_norm.weight.clone() for b in model.layers]
    quant = QuantConfig(bits=4, group_size=16)
    run_blocks(model, block_inputs(model, ids), lambda i, block, xs: awq.scale_block(model, block, xs, quant))
    torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
    assert not all(torch.equal(n, b.attn_norm.weight) for n, b in zip(norms, model.layers, strict=True))


@pytest.mark.parametrize("symmetric,group", [(True, 16), (False, 32), (True, 0)])
def test_output_error_at_most_round_to_nearest(symmetric, group):
    base, ids = tiny_model(seed=3), windows(seed=1)
    reference = base(ids)
    quant = QuantConfig(bits=4, group_size=group, symmetric=symmetric)
    scaled, rounded = copy.deepcopy(base), copy.deepcopy(base)
    summary = awq.quantize_awq(scaled, ids, quant)
    rtn.quantize_rtn(rounded, 4, group, symmetric)
    assert isinstance(scaled.layers[0].attn.qkv, QuantLinear)
    assert summary["output_mse"] <= summary["rtn_output_mse"]
    awq_err = (scaled(ids) - reference).pow(2).mean()
    rtn_err = (rounded(ids) - reference).pow(2).mean()
    assert awq_err <= rtn_err


def test_awq_run_loads_back(tiny_run, tiny_text, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text[:20_000])
    args = ["compress", str(tiny_run), "method=awq", f"calibration.path={calib}", "calibration.samples=8"]
    cli.main([*args, "calibration.seq_len=64", "quant.group_size=32", f"run.root={tmp_path}", "run.name=a"])
    model, _ = load_run(tmp_path / "a")
    assert model.compression["method"] == "awq"
    assert isinstance(model.layers[0].mlp.down, QuantLinear) and model.layers[0].mlp.down.group_size == 32
    summary = json.loads((tmp_path / "a" / "compress.json").read_text())
    assert summary["output_mse"] <= summary["rtn_output_mse"]
