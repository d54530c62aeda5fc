"""Magnitude, Wanda and SparseGPT pruning: exact sparsity, N:M groups, Wanda's mask against its formula, SparseGPT
against a float64 optimal-brain-surgeon reference and against magnitude's layer error."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmforge import cli
from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.compress.calibration import block_inputs, block_linears, calibration_windows, capture, hessians
from lmforge.compress.config import CompressConfig, PruneConfig
from lmforge.compress.modules import linear_names
from lmforge.compress.prune import prune_wanda
from lmforge.compress.sparsegpt import sparsegpt_weight


@pytest.fixture(scope="module")
def calib(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(tiny_text[:20_000])
    return path


def compress(tiny_run, calib, root, name, *options):
    cli.main(["compress", str(tiny_run), *options, f"calibration.path={calib}", "calibration.samples=8"]
             + ["calibration.seq_len=64", f"run.root={root}", f"run.name={name}"])  # fmt: skip
    return load_run(root / name)[0]


def test_magnitude_prunes_exactly_the_smallest(tiny_run, calib, tmp_path):
    pruned = compress(tiny_run, calib, tmp_path, "mag", "method=magnitude", "prune.sparsity=0.3")
    base = load_run(tiny_run)[0]
    for name in linear_names(base):
        w, p = base.get_submodule(name).weight, pruned.get_submodule(name).weight
        zero = p == 0
        assert int(zero.sum()) == int(w.numel() * 0.3)
        assert w[zero].abs().max() <= w[~zero].abs().min()
        assert torch.equal(p[~zero], w[~zero])
    info = json.loads((latest_checkpoint(tmp_path / "mag") / "compression.json").read_text())
    assert info["method"] == "magnitude" and info["modules"] == {}
    summary = json.loads((tmp_path / "mag" / "compress.json").read_text())
    assert summary["sparsity_mlp.down"] == pytest.approx(int(128 * 64 * 0.3) / (128 * 64), abs=1e-6)


@pytest.mark.parametrize("method,pattern", [("magnitude", "1:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")])
def test_n_of_m_pattern_holds_in_every_group(tiny_run, calib, tmp_path, method, pattern):
    pruned = compress(tiny_run, calib, tmp_path, method, f"method={method}", f"prune.pattern={pattern}")
    n, m = map(int, pattern.split(":"))
    for name in linear_names(pruned):
        w = pruned.get_submodule(name).weight
        nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(dim=-1)  # (out, in / M)
        assert (nonzero == n).all(), name


def test_wanda_mask_is_the_formulas(tiny_run, tiny_tokenizer, calib):
    base, tokenizer = load_run(tiny_run)
    windows = calibration_windows(tokenizer, calib, 8, 64)
    cfg = CompressConfig(prune=PruneConfig(sparsity=0.5))
    pruned = copy.deepcopy(base)
    prune_wanda(pruned, cfg, windows)
    for i in range(base.cfg.n_layers):
        # block i's inputs come from the pruned blocks before it, its own linears see its unpruned activations
        hybrid = copy.deepcopy(base)
        for j in range(i):
            hybrid.layers[j] = copy.deepcopy(pruned.layers[j])
        names = block_linears(hybrid.layers[i])
        inputs: dict[str, torch.Tensor] = {}
        with torch.no_grad(), capture(hybrid.layers[i], names, inputs.__setitem__):  # one forward: one input each
            hybrid(windows)
        for name in names:
            w = base.layers[i].get_submodule(name).weight
            norms = inputs[name].norm(dim=0)  # ||X_j||_2 over every calibration token
            score = w.abs() * norms
            reference = score <= score.kthvalue(w.shape[1] // 2, dim=1, keepdim=True).values
            assert torch.equal(pruned.layers[i].get_submodule(name).weight == 0, reference), (i, name)


def obs_reference(W, H, sparsity, pattern, block, damp):
    """SparseGPT as optimal brain surgeon in float64: the inverse Hessian updated by Gaussian elimination column by
    column (no Cholesky factor, no lazy batches); mask by w^2 / pivot over each block of columns."""
    W, H = W.double().clone(), H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    pivots, rows_of_inv, E = [], [], Hinv.clone()
    for i in range(len(H)):
        pivots.append(E[i, i].item())
        rows_of_inv.append(E[i].clone())
        E = E - torch.outer(E[:, i], E[i]) / E[i, i]
    pivots = torch.tensor(pivots, dtype=torch.float64)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if pattern and i % pattern[1] == 0:
            n, m = pattern
            score = W[:, i : i + m] ** 2 / pivots[i : i + m]
            mask[:, i : i + m].scatter_(1, score.argsort(dim=1)[:, : m - n], True)
        elif not pattern and i % block == 0:
            score = (W[:, i : i + block] ** 2 / pivots[i : i + block]).flatten()
            chunk = torch.zeros_like(score, dtype=torch.bool)
            chunk[score.argsort()[: int(len(score) * sparsity)]] = True
            mask[:, i : i + block] = chunk.reshape(W.shape[0], -1)
        err = torch.where(mask[:, i], W[:, i], 0.0) / pivots[i]
        W -= torch.outer(err, rows_of_inv[i])
    return W


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_equals_float64_obs_reference(pattern):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 48, generator=g) @ torch.randn(48, 48, generator=g)  # correlated inputs
    W = torch.randn(16, 48, generator=g)
    H = 2 * X.T @ X / len(X)
    ours = sparsegpt_weight(W, H, 0.5, pattern, 16, 0.01)
    reference = obs_reference(W, H, 0.5, pattern, 16, 0.01)
    assert torch.equal(ours == 0, reference.abs() < 1e-9)
    torch.testing.assert_close(ours.double(), reference, atol=1e-4, rtol=1e-4)


def test_sparsegpt_layer_error_below_magnitude(tiny_run, calib):
    base, tokenizer = load_run(tiny_run)
    block = base.layers[0]
    xs = block_inputs(base, calibration_windows(tokenizer, calib, 8, 64))
    names = block_linears(block)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    with torch.no_grad(), capture(block, names, lambda n, x: inputs[n].append(x)):
        for x in xs:
            block(x, base.positions, torch.arange(x.shape[1]))
    for name, H in hessians(base, block, names, xs).items():
        w, X = block.get_submodule(name).weight.detach(), torch.cat(inputs[name])
        ours = sparsegpt_weight(w, H, 0.5, None, 128, 0.01)
        magnitude = torch.where(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values, w, 0.0)
        assert (ours == 0).float().mean() == 0.5 and (magnitude == 0).float().mean() == 0.5
        error = ((X @ (w - ours).T).square().sum() / (X @ (w - magnitude).T).square().sum()).item()
        assert error < 0.9, f"{name}: SparseGPT's output error is {error:.2f} of magnitude's"


def test_pattern_that_does_not_divide_the_inputs_exits_2(tiny_run, calib, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        compress(tiny_run, calib, tmp_path, "bad", "method=magnitude", "prune.pattern=2:3")
    assert exit_.value.code == 2 and not (tmp_path / "bad").exists()
