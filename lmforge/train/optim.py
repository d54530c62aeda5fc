"""Optimizers: AdamW with decay only on matrices, or Muon (Jordan et al., 2024) for the matrices inside blocks
with AdamW for the rest. Both come from torch.optim."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmforge.train.config import TrainConfig


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers for `model`; the loop steps every one of them."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden_matrices = {n for n, p in params.items() if p.ndim == 2 and n.startswith("layers.")}
    muon_names = hidden_matrices if cfg.optimizer == "muon" else set()
    decay = [p for n, p in params.items() if p.ndim >= 2 and n not in muon_names]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params.values())
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
    ]
    if muon_names:
        matrices = [params[n] for n in sorted(muon_names)]
        # match_rms_adamw scales each update to AdamW's RMS, so muon_lr behaves like a (larger) AdamW rate
        optimizers.append(
            torch.optim.Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        )
    return optimizers
