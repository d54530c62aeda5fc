"""Low-rank factorisation: ranks by energy match numpy's singular values, the budget is kept, a full-energy
factorisation keeps the logits, and a recovered run loads back with the logits it had in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_run
from lmforge.cli import main
from lmforge.compress.lowrank import LowRankLinear, rank_by_energy, ranks_by_budget


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_rank_by_energy_matches_numpy(energy):
    w = torch.randn(40, 24, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 24, dtype=torch.float64))
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    expected = int(np.argmax(share >= energy - 1e-12)) + 1
    assert rank_by_energy(torch.linalg.svdvals(w), energy) == expected


def test_full_rank_factors_reproduce_the_matrix_and_budget_is_kept():
    w = torch.randn(12, 20)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    layer = LowRankLinear.from_svd(u, s, vh, 12)
    x = torch.randn(3, 20)
    assert torch.allclose(layer.weight, w, atol=1e-5) and torch.allclose(layer(x), x @ w.T, atol=1e-4)
    shapes = {"a": (64, 32), "b": (32, 96)}
    spectra = {name: torch.linalg.svdvals(torch.randn(*shape)) for name, shape in shapes.items()}
    ranks = ranks_by_budget(spectra, shapes, 0.3)
    spent = sum(ranks[n] * sum(shapes[n]) for n in shapes)
    assert spent <= 0.3 * sum(o * i for o, i in shapes.values()) and min(ranks.values()) >= 1


def test_energy_one_keeps_the_logits(tmp_path, tiny_run, tiny_text, compress_tiny):
    base, _ = load_run(tiny_run)
    result, _ = compress_tiny(tmp_path, tiny_run, tiny_text, "method=lowrank", "lowrank.energy=1.0")
    idx = torch.randint(0, 512, (2, 16))
    assert torch.allclose(result.model(idx), base(idx), atol=1e-4)


def test_recovered_run_loads_back_with_its_logits(tmp_path, tiny_run, tiny_text, compress_tiny):
    overrides = ["method=lowrank", "lowrank.energy=0.5", "lowrank.recover_steps=4", "train.lr=1e-3"]
    result, path = compress_tiny(tmp_path, tiny_run, tiny_text, *overrides)
    summary = result.summary
    assert summary["factored"] and summary["linear_params_after"] < summary["linear_params_before"]
    assert summary["recover_held_out_after"] < summary["recover_held_out_before"]
    model, _ = load_run(path)
    layers = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert layers == summary["factored"]
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(model(idx), result.model(idx))


def test_recovery_without_calibration_text_exits_2_before_writing(tmp_path, tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(tiny_run), "method=lowrank", "lowrank.recover_steps=5", f"run.root={tmp_path}"])
    assert exit_.value.code == 2 and "calibration.path" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("metrics.jsonl"))
