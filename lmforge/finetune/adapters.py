"""Bottleneck adapters (Houlsby et al., 2019): after each block's attention and after its MLP, h + up(gelu(down(h)))
with the up projection zero-initialised, so training starts from the base model exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.finetune.tuned import Tuned
from lmforge.models import Decoder

if TYPE_CHECKING:
    from lmforge.finetune.methods import PeftConfig


class Adapted(nn.Module):
    """`inner`'s output h, then h + up(gelu(down(h))); takes whatever arguments `inner` takes."""

    def __init__(self, inner: nn.Module, dim: int, bottleneck: int):
        super().__init__()
        self.inner = inner
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, *args, **kwargs) -> Tensor:
        h = self.inner(*args, **kwargs)
        return h + self.up(F.gelu(self.down(h)))


class AdapterTuned(Tuned):
    merges = False  # the adapters are non-linear: no plain decoder computes the same


def tune_adapters(model: Decoder, cfg: PeftConfig) -> Tuned:
    model.requires_grad_(False)
    w = model.embed.weight
    for block in model.layers:
        block.attn = Adapted(block.attn, model.cfg.dim, cfg.adapter_dim).to(w.device, w.dtype)
        block.mlp = Adapted(block.mlp, model.cfg.dim, cfg.adapter_dim).to(w.device, w.dtype)
    return AdapterTuned(model, cfg)
