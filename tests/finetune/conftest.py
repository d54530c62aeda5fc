"""A tiny llama-style base model with every weight random (fresh init leaves norms at 1, which hides mix-ups)."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import Decoder, ModelConfig, build_model

TINY = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)


def _make_base(seed: int = 0, **overrides) -> Decoder:
    model = build_model(ModelConfig(**(TINY | dict(norm_eps=1e-6, rope_theta=500.0) | overrides)), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _randomize(module: torch.nn.Module, seed: int = 2, std: float = 0.1) -> None:
    """Give trainable weights that start at zero (LoRA's B, an adapter's up projection) values that show in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))


@pytest.fixture
def make_base():
    """make_base(seed=0, **model overrides) -> a Decoder with random weights."""
    return _make_base


@pytest.fixture
def randomize():
    """randomize(module, seed=2, std=0.1): noise on every trainable weight."""
    return _randomize
