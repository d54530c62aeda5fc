"""Learning-rate schedules as multipliers of the peak: linear warmup, then cosine decay or WSD
(warmup-stable-decay, Hu et al., 2024 "MiniCPM")."""

from __future__ import annotations

import math

import torch

from lmforge.train.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = cfg.steps - int(cfg.decay_fraction * cfg.steps)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], cfg: TrainConfig
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, cfg)) for opt in optimizers]
