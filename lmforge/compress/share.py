"""Cross-layer weight sharing (ALBERT, Lan et al., 2020): the base's layers fall into share.groups runs of
consecutive layers, each run served by one block's weights (initialised from the run's first layer, which measured
better than the mean of its layers: share.init), then a recovery fine-tune.

    lmforge compress tiny method=share share.groups=2 share.recover_steps=200 calibration.path=text.txt
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.modules import BUILDERS
from lmforge.compress.recover import held_out_loss, require_windows, split, train
from lmforge.errors import LmforgeError
from lmforge.models import Decoder
from lmforge.models.decoder import Block
from lmforge.run import Run


class SharedBlock(Block):
    """A block that runs with its own layer index (its own KV-cache slot) on the norms, attention projections and MLP
    of the block named `source`: after bind(model) those are the very same modules, so their tensors are saved once
    and a gradient reaches them from every layer that uses them."""

    def __init__(self, block: Block, source: str):
        nn.Module.__init__(self)
        for name, child in block.named_children():
            setattr(self, name, child)
        self.source = source

    def bind(self, model: nn.Module) -> None:
        source = model.get_submodule(self.source)
        for name, child in source.named_children():
            if name == "attn":  # attention keeps its own layer index; only its projections are shared
                for inner, projection in child.named_children():
                    setattr(self.attn, inner, projection)
            else:
                setattr(self, name, child)

    def spec(self) -> dict[str, Any]:
        return {"kind": "shared", "source": self.source}


BUILDERS["shared"] = lambda old, spec: SharedBlock(old, spec["source"])


def groups_of(n_layers: int, groups: int) -> list[list[int]]:
    """n_layers split into `groups` runs of consecutive layers, the longer runs first."""
    size, extra = divmod(n_layers, groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        out.append(list(range(start, end)))
        start = end
    return out


@torch.no_grad()
def share_layers(model: Decoder, groups: int, init: str = "first") -> Decoder:
    """Make each run of layers use its first layer's modules, holding the run's mean weights (init="mean") or the
    first layer's own (init="first"), in place."""
    for members in groups_of(len(model.layers), groups):
        first = model.layers[members[0]]
        if init == "mean":
            for name, param in first.named_parameters():
                param.copy_(torch.stack([model.layers[i].get_parameter(name) for i in members]).mean(0))
        for i in members[1:]:
            model.layers[i] = SharedBlock(model.layers[i], f"layers.{members[0]}")
            model.layers[i].bind(model)
    return model


def compress(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor | None, run: Run):
    """method=share: share.groups distinct blocks, then share.recover_steps recovery steps."""

    sc, n_layers = cfg.share, model.cfg.n_layers
    groups = sc.groups or max(1, n_layers // 2)
    if groups > n_layers:
        raise LmforgeError(f"share.groups={groups} exceeds the base's {n_layers} layers; choose 1..{n_layers}")
    require_windows(windows, sc.recover_steps, "share.recover_steps")
    params_before = model.num_params()
    summary: dict[str, Any] = {"groups": groups, "init": sc.init}
    if windows is not None:
        windows, held = split(windows)
        summary["held_out_base"] = held_out_loss(model, held)
    share_layers(model, groups, sc.init)
    summary.update({"params_before": params_before, "params_after": model.num_params()})
    if windows is not None:
        summary.update(train(model, windows, held, cfg.train, run, sc.recover_steps, seed=cfg.run.seed))
    return Compressed(model, summary, sc.recover_steps)
