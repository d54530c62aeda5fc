"""NF4 weights (Dettmers et al., 2023) as a compression method: every block linear (and the head with quant.head)
held as 4-bit NormalFloat codes in blocks of 64 with double-quantized absmax scales, bitsandbytes' layout
(lmforge.finetune.nf4), with no calibration.

    lmforge compress tiny method=nf4 run.name=tiny-nf4
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmforge.compress.compressed import Compressed
from lmforge.compress.modules import linear_names
from lmforge.finetune.nf4 import NF4Linear

if TYPE_CHECKING:
    from lmforge.compress.config import CompressConfig
    from lmforge.models import Decoder
    from lmforge.run import Run


@torch.no_grad()
def quantize_nf4_model(model: torch.nn.Module, head: bool = False) -> None:
    """Replace every block linear (and the LM head with head=True) by its NF4Linear, in place."""
    for name in linear_names(model, head):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, NF4Linear(model.get_submodule(name)))


def compress(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor | None, run: Run) -> Compressed:
    """main.METHODS["nf4"]."""

    quantize_nf4_model(model, cfg.quant.head)
    return Compressed(model)
