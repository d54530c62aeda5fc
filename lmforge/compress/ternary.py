"""Ternary weights (BitNet b1.58, Ma et al., 2024): each block linear's weight becomes {-1, 0, +1} times its row's
absmean scale, w_q = round(clip(w / mean|w|, -1, 1)), trained quantization-aware through a straight-through
estimator (the forward pass sees the ternary weight, the gradient reaches the float latent weight), then stored as
packed 2-bit codes and one float scale per row.

    lmforge compress tiny method=ternary calibration.path=text.txt train.steps=200 run.name=tiny-ternary
    lmforge compress tiny method=ternary run.name=tiny-ternary-ptq    (no calibration text: no QAT)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import Tensor

from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.modules import BUILDERS, linear_names
from lmforge.compress.recover import held_out_loss, split, train
from lmforge.models import Decoder
from lmforge.run import Run


def ternary_codes(w: Tensor, per_row: bool = True) -> tuple[Tensor, Tensor]:
    """w (out, in) -> (codes in {-1, 0, 1} as w's dtype, scale (out, 1)): scale = mean|w| of the row (or of the whole
    tensor), codes = round(clip(w / scale, -1, 1))."""
    absw = w.abs()
    scale = absw.mean(dim=1, keepdim=True) if per_row else absw.mean().expand(w.shape[0], 1)
    scale = scale.clamp_min(1e-8)
    return (w / scale).clamp(-1, 1).round(), scale


def ternarize(w: Tensor) -> Tensor:
    codes, scale = ternary_codes(w)
    return codes * scale


class StraightThrough(nn.Module):
    """A parametrization: forward uses the ternary weight, backward passes the gradient to the latent weight as is."""

    def forward(self, w: Tensor) -> Tensor:
        return w + (ternarize(w) - w).detach()


def pack_ternary(codes: Tensor) -> Tensor:
    """(out, in) codes in {-1, 0, 1} -> (out, ceil(in / 4)) uint8: code + 1 in two bits, column 4j + k in bits 2k."""
    out, n = codes.shape
    padded = torch.ones(out, -(-n // 4) * 4, dtype=torch.uint8, device=codes.device)  # padding decodes to 0
    padded[:, :n] = (codes + 1).to(torch.uint8)
    padded = padded.view(out, -1, 4)  # (out, in / 4, 4)
    return (padded[..., 0] | padded[..., 1] << 2 | padded[..., 2] << 4 | padded[..., 3] << 6).contiguous()


def unpack_ternary(packed: Tensor, in_features: int) -> Tensor:
    """The (out, in) codes in {-1, 0, 1} (int8) of pack_ternary's bytes."""
    parts = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)  # (out, in / 4, 4)
    return parts.reshape(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1


class TernaryLinear(nn.Module):
    """A linear layer whose weight is 2-bit packed ternary codes times a float32 scale per output row; forward
    dequantizes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, -(-in_features // 4), dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> TernaryLinear:
        w = linear.weight.detach().float()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None).to(w.device)
        codes, scale = ternary_codes(w)
        layer.qweight.copy_(pack_ternary(codes))
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def spec(self) -> dict[str, Any]:
        return {"kind": "ternary"}

    def codes(self) -> Tensor:
        return unpack_ternary(self.qweight, self.in_features)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in), float32."""
        return self.codes().float() * self.scale

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


BUILDERS["ternary"] = lambda old, spec: TernaryLinear(old.in_features, old.out_features, old.bias is not None)


def compress(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor | None, run: Run):
    """method=ternary: QAT for train.steps steps on the calibration text (without one: ternarise only), then pack
    every block linear."""

    steps = cfg.train.steps if windows is not None else 0  # train.steps cannot be 0: no text means no QAT
    names = linear_names(model)
    summary: dict[str, float] = {}
    if windows is not None:
        windows, held = split(windows)
        summary["held_out_float"] = held_out_loss(model, held)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", StraightThrough())
    if windows is not None:
        # "before" is the ternary model without QAT, "after" the ternary model after it
        summary.update(train(model, windows, held, cfg.train, run, steps, label="qat", seed=cfg.run.seed))
    for name in names:
        linear = model.get_submodule(name)
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)  # back to the latent weight
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, TernaryLinear.from_float(linear))
    return Compressed(model, {"ternary_layers": len(names), **summary}, steps)
