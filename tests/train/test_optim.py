"""Optimizer groups and learning-rate schedules."""

import math

import pytest
import torch

from lmforge.models import ModelConfig, build_model
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizers
from lmforge.train.schedule import build_schedulers, lr_multiplier


def model():
    return build_model(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, bias=True), seed=0)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_every_parameter_in_exactly_one_group(name):
    m = model()
    optimizers = build_optimizers(m, TrainConfig(optimizer=name))
    grouped = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(m.parameters()))
    if name == "muon":
        muon = optimizers[1]
        assert isinstance(muon, torch.optim.Muon)
        assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
        assert not any(p is m.embed.weight or p is m.lm_head.weight for p in muon.param_groups[0]["params"])


def test_no_weight_decay_on_norms_and_biases():
    m = model()
    adamw = build_optimizers(m, TrainConfig(weight_decay=0.1))[0]
    for group in adamw.param_groups:
        assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_adamw_step_matches_torch_reference():
    a, b = model(), model()
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    ours = build_optimizers(a, cfg)[0]
    decay = [p for p in b.parameters() if p.ndim >= 2]
    no_decay = [p for p in b.parameters() if p.ndim < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95)
    )
    idx = torch.randint(0, 64, (2, 16))
    for m, opt in ((a, ours), (b, ref)):
        for _ in range(3):
            m(idx, idx).backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def test_cosine_schedule_shape():
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_linear():
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_multiplier(s, cfg) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, cfg) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg) == pytest.approx(0.0)


def test_scheduler_drives_every_optimizer():
    m = model()
    cfg = TrainConfig(optimizer="muon", steps=10, warmup_steps=5, lr=1e-3, muon_lr=0.02)
    optimizers = build_optimizers(m, cfg)
    schedulers = build_schedulers(optimizers, cfg)
    for _ in range(4):
        for opt in optimizers:
            opt.step()
        for s in schedulers:
            s.step()
    assert optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 5 / 5)
    assert optimizers[1].param_groups[0]["lr"] == pytest.approx(0.02 * 5 / 5)
