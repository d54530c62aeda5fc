"""Ternary weights (BitNet b1.58): codes and scales follow the absmean formula, the straight-through gradient is the
gradient through the dequantized weight, and a QAT run loads back with the logits it had in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

from lmforge.checkpoint import load_run
from lmforge.compress.config import CompressConfig
from lmforge.compress.main import METHODS
from lmforge.compress.ternary import (
    StraightThrough,
    TernaryLinear,
    pack_ternary,
    ternarize,
    ternary_codes,
    unpack_ternary,
)
from lmforge.config import load_config


def test_codes_and_scale_follow_the_absmean_formula():
    w = torch.randn(6, 10)
    codes, scale = ternary_codes(w)
    gamma = w.abs().mean(dim=1, keepdim=True)
    assert torch.equal(scale, gamma)
    assert torch.equal(codes, torch.round(torch.clamp(w / gamma, -1, 1)))
    assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(unpack_ternary(pack_ternary(codes), 10).float(), codes)  # 10 columns: padding is cut
    linear = torch.nn.Linear(10, 6)
    layer = TernaryLinear.from_float(linear)
    assert layer.qweight.shape == (6, 3) and layer.qweight.dtype == torch.uint8
    assert torch.allclose(layer.weight, ternarize(linear.weight.detach()))
    x = torch.randn(3, 10)
    assert torch.allclose(layer(x), F.linear(x, ternarize(linear.weight.detach()), linear.bias), atol=1e-6)


def test_straight_through_gradient_is_the_gradient_through_the_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    x, target = torch.randn(5, 16), torch.randn(5, 8)
    dequantized = ternarize(linear.weight.detach()).requires_grad_(True)
    F.mse_loss(F.linear(x, dequantized), target).backward()
    parametrize.register_parametrization(linear, "weight", StraightThrough())
    out = linear(x)
    assert torch.allclose(out, F.linear(x, dequantized.detach()))  # the forward pass sees the ternary weight
    F.mse_loss(out, target).backward()
    latent = linear.parametrizations.weight.original
    assert torch.allclose(latent.grad, dequantized.grad)


def test_qat_run_loads_back_with_its_logits(tmp_path, tiny_run, tiny_text, compress_tiny):
    result, path = compress_tiny(tmp_path, tiny_run, tiny_text, "method=ternary", "train.steps=4", "train.lr=1e-3")
    assert result.summary["qat_held_out_after"] < result.summary["qat_held_out_before"]  # QAT helps
    model, _ = load_run(path)
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 2 * 4 and model.compression["method"] == "ternary"
    assert all(set(layer.codes().unique().tolist()) <= {-1, 0, 1} for layer in layers)
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(model(idx), result.model(idx))


def test_without_calibration_text_ternary_is_post_training_only(tiny_run):
    model, tokenizer = load_run(tiny_run)
    cfg = load_config(CompressConfig, None, [f"base={tiny_run}", "method=ternary"])
    expected = ternarize(model.layers[0].mlp.down.weight.detach())
    result = METHODS["ternary"](cfg, model, tokenizer, None, None)
    assert result.steps == 0 and "qat_held_out_after" not in result.summary
    assert torch.equal(result.model.layers[0].mlp.down.weight, expected)
