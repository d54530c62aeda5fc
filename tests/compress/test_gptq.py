"""GPTQ: the lazy-batch Cholesky form gives the codes of a plain column-by-column OBS update, beats round to nearest
on its calibration inputs, and its runs (act_order, groups, asymmetric) save and load back through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.checkpoint import load_run
from lmforge.compress import rtn
from lmforge.compress.gptq import quantize_layer
from lmforge.compress.modules import QuantLinear


def naive_gptq(w, h, bits, size, symmetric, act_order, damp, observer="minmax"):
    """Optimal Brain Quantization one column at a time in float64: quantize a column, spread its error over the
    remaining columns with the inverse Hessian, then drop that column from the inverse (Frantar et al., 2022, eq. 2-3),
    with no Cholesky factor and no lazy batches."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = [p.reshape(rows, -1) for p in rtn.group_params(w.reshape(-1, size), bits, symmetric, observer)]
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols)
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    scale = zero = None
    left = list(order.tolist())
    while left:
        j = left.pop(0)
        if act_order:
            scale, zero = static[0][:, j // size], static[1][:, j // size]
        elif j % size == 0:
            scale, zero = rtn.group_params(w[:, j : j + size], bits, symmetric, observer)
        q = rtn.quantize(w[:, j], scale, zero, bits)
        codes[:, j] = q
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, left] -= err[:, None] * hinv[j, left][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scale = torch.linspace(0.2, 3.0, cols)[torch.randperm(cols, generator=g)]
    return (torch.randn(n, cols, generator=g) @ mix) * scale


@pytest.mark.parametrize(
    "act_order,symmetric,size,block,observer",
    [
        (False, True, 16, 24, "minmax"),
        (False, False, 32, 16, "minmax"),
        (True, True, 16, 24, "minmax"),
        (False, True, 16, 24, "mse"),
        (True, False, 16, 24, "mse"),
    ],
)
def test_lazy_batches_give_the_naive_updates_codes(act_order, symmetric, size, block, observer):
    x = correlated_inputs(512, 64).double()
    x[:, 5] = 0  # a dead input
    h = 2 * x.T @ x / len(x)
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes, scales, zeros = quantize_layer(w, h, 4, size, symmetric, act_order, 0.01, block, observer)
    expected = naive_gptq(w, h, 4, size, symmetric, act_order, 0.01, observer)
    assert torch.equal(codes, expected)
    assert scales.shape == zeros.shape == (12, 64 // size)


@pytest.mark.parametrize("bits,act_order,symmetric", [(4, False, True), (4, True, False), (8, False, True)])
def test_output_error_below_round_to_nearest(bits, act_order, symmetric):
    x = correlated_inputs(2048, 128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    h = 2 * x.T @ x / len(x)
    codes, scales, zeros = quantize_layer(w, h, bits, 32, symmetric, act_order)
    gptq_w = QuantLinear.from_codes(codes, scales, zeros, bits).weight
    rtn_w = QuantLinear.from_codes(*rtn.quantize_weight(w, bits, 32, symmetric), bits).weight
    gptq_err = (x @ (w - gptq_w).T).pow(2).mean()
    rtn_err = (x @ (w - rtn_w).T).pow(2).mean()
    assert gptq_err < 0.8 * rtn_err


@pytest.fixture(scope="module")
def calib(tmp_path_factory, tiny_text) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(tiny_text[:40_000])
    return path


def compress(*args: str) -> int:
    try:
        cli.main(["compress", *args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.mark.parametrize(
    "options", [["quant.act_order=true", "quant.group_size=32"], ["quant.symmetric=false", "quant.group_size=0"]]
)
def test_gptq_run_loads_back(tiny_run, calib, tmp_path, options):
    base, _ = load_run(tiny_run)
    args = [str(tiny_run), "method=gptq", f"calibration.path={calib}", "calibration.samples=8"]
    assert compress(*args, "calibration.seq_len=64", *options, f"run.root={tmp_path}", "run.name=q") == 0
    model, _ = load_run(tmp_path / "q")
    assert model.compression["method"] == "gptq"
    assert model.compression["options"]["quant"]["observer"] == "mse"  # the method's default, recorded as used
    layer = model.layers[1].mlp.down
    assert isinstance(layer, QuantLinear) and layer.bits == 4
    assert layer.group_size == (32 if "quant.group_size=32" in options else layer.in_features)
    summary = json.loads((tmp_path / "q" / "compress.json").read_text())
    assert summary["output_mse"] > 0 and summary["seconds"] >= 0
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    drift = (model(ids) - base(ids)).abs().mean() / base(ids).abs().mean()
    assert 0 < drift < 0.2


def test_bad_input_writes_nothing(tiny_run, calib, tmp_path):
    assert compress(str(tiny_run), "method=gptq", f"run.root={tmp_path}", "run.name=nocal") == 2
    assert not (tmp_path / "nocal").exists()
    args = [str(tiny_run), "method=gptq", f"calibration.path={calib}", "quant.observer=percentile"]
    assert compress(*args, f"run.root={tmp_path}", "run.name=badobserver") == 2
    assert not (tmp_path / "badobserver").exists()
    args = [str(tiny_run), "method=gptq", f"calibration.path={calib}", "quant.group_size=48"]
    assert compress(*args, f"run.root={tmp_path}", "run.name=badgroup") == 2
    assert not any((tmp_path / "badgroup").glob("*"))  # the CLI makes the run folder before the method runs
