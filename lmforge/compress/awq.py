"""AWQ (Lin et al., 2023): before rounding, scale each input channel of the linears that share an input by
s = mean|x|^alpha (alpha searched on a grid to minimise the quantized sublayer's output error) and fold 1/s into the
operation before them (the norm, or the rows of the linear that feeds them), so salient channels lose less to
rounding; then round to nearest.

    lmforge compress tiny method=awq calibration.path=text.txt quant.group_size=128 run.name=tiny-awq
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.compress import rtn
from lmforge.compress.calibration import block_inputs, capture, run_blocks
from lmforge.compress.compressed import Compressed
from lmforge.compress.modules import QuantLinear, linear_names
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.compress.config import CompressConfig, QuantConfig
    from lmforge.models import Decoder
    from lmforge.run import Run

GRID = 20  # alphas 0, 0.05, ..., 0.95 (AutoAWQ's n_grid); alpha = 0 is plain round to nearest
SEARCH_WINDOWS = 2  # calibration windows the grid is scored on (the statistics use all): 20 passes cost CPU time


def fake_quant(w: Tensor, bits: int, group_size: int, symmetric: bool, observer: str = "minmax") -> Tensor:
    """w rounded to its round-to-nearest grid and back (float32)."""
    codes, scales, zeros = rtn.quantize_weight(w, bits, group_size, symmetric, observer)
    size = group_size or w.shape[1]
    groups = codes.reshape(w.shape[0], -1, size)
    return ((groups - zeros[..., None]) * scales[..., None]).reshape(w.shape)


@torch.no_grad()
def search_scale(
    x_mean: Tensor, linears: list[nn.Linear], run: Callable[[], list[Tensor]], quant: QuantConfig
) -> tuple[Tensor, float, float]:
    """The per-input-channel scale for `linears` (sharing inputs whose mean |x| is x_mean) that minimises the MSE of
    run()'s outputs against their float values, each linear's weight fake-quantized as Q(W diag(s)) diag(s)^-1 ->
    (s, its loss, round to nearest's loss)."""
    bits, size = quant.bits, quant.groups(quant.bits)
    reference = run()
    originals = [linear.weight.detach().clone() for linear in linears]
    best, best_loss, rtn_loss = torch.ones_like(x_mean), float("inf"), float("inf")
    for k in range(GRID):
        s = x_mean.pow(k / GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for linear, w in zip(linears, originals, strict=True):
            linear.weight.copy_(fake_quant(w * s, bits, size, quant.symmetric, quant.observer_for("awq")) / s)
        loss = sum(float((y - r).float().pow(2).sum()) for y, r in zip(run(), reference, strict=True))
        loss /= sum(r.numel() for r in reference)
        rtn_loss = loss if k == 0 else rtn_loss
        if loss < best_loss:
            best, best_loss = s, loss
    for linear, w in zip(linears, originals, strict=True):
        linear.weight.copy_(w)
    return best, best_loss, rtn_loss


@torch.no_grad()
def fold(s: Tensor, before: nn.Module, rows: slice, linears: list[nn.Linear]) -> None:
    """Scale the linears' input channels by s and the output rows `rows` of `before` (a norm or a linear) by 1/s."""
    for linear in linears:
        linear.weight.mul_(s)
    if isinstance(before, nn.Linear):
        before.weight[rows].div_(s[:, None])
    else:
        before.weight[rows].div_(s)
    if getattr(before, "bias", None) is not None:
        before.bias[rows].div_(s)


def input_means(model, block: nn.Module, names: list[str], xs: list[Tensor]) -> dict[str, Tensor]:
    """Mean |x| per input channel of each named linear of the block over all calibration windows."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: Tensor) -> None:
        sums[name] = sums.get(name, 0) + x.float().abs().sum(0)
        counts[name] = counts.get(name, 0) + len(x)

    with capture(block, names, record):
        for x in xs:
            block(x, model.positions, torch.arange(x.shape[1], device=x.device))
    return {name: sums[name] / counts[name] for name in names}


def inputs_of(model, block: nn.Module, name: str, xs: list[Tensor]) -> list[Tensor]:
    rows: list[Tensor] = []
    with capture(block, [name], lambda _n, x: rows.append(x)):
        for x in xs:
            block(x, model.positions, torch.arange(x.shape[1], device=x.device))
    return rows


@torch.no_grad()
def scale_block(model, block: nn.Module, xs: list[Tensor], quant: QuantConfig) -> dict[str, tuple[float, float]]:
    """Search and fold the AWQ scales of one block in place -> {group: (its loss, round to nearest's loss)}."""
    attn, mlp, swiglu = block.attn, block.mlp, hasattr(block.mlp, "gate_up")
    first = mlp.gate_up if swiglu else mlp.up
    names = ["attn.qkv", "attn.proj", "mlp.gate_up" if swiglu else "mlp.up", "mlp.down"]
    means = input_means(model, block, names, xs)
    search = [xs[0][:SEARCH_WINDOWS]]
    pos = [torch.arange(x.shape[1], device=x.device) for x in search]
    losses = {}

    def attention() -> list[Tensor]:
        return [attn(block.attn_norm(x), model.positions, p) for x, p in zip(search, pos, strict=True)]

    s, *losses["attn.qkv"] = search_scale(means["attn.qkv"], [attn.qkv], attention, quant)
    fold(s, block.attn_norm, slice(None), [attn.qkv])
    if attn.n_heads == attn.n_kv_heads:  # each proj input channel is one v row (not so when heads share values)
        v_start = (attn.n_heads + attn.n_kv_heads) * attn.head_dim
        rows = inputs_of(model, block, "attn.proj", search)
        s, *losses["attn.proj"] = search_scale(
            means["attn.proj"], [attn.proj], lambda: [attn.proj(r) for r in rows], quant
        )
        fold(s, attn.qkv, slice(v_start, v_start + attn.proj.in_features), [attn.proj])
    hidden = inputs_of(model, block, "mlp_norm", search)
    s, *losses["mlp.first"] = search_scale(
        means[names[2]], [first], lambda: [mlp(block.mlp_norm(h)) for h in hidden], quant
    )
    fold(s, block.mlp_norm, slice(None), [first])
    if swiglu:  # down's inputs are silu(gate) * up: linear in the up rows (GELU's are not)
        rows = inputs_of(model, block, "mlp.down", search)
        s, *losses["mlp.down"] = search_scale(means["mlp.down"], [mlp.down], lambda: [mlp.down(r) for r in rows], quant)
        fold(s, mlp.gate_up, slice(mlp.down.in_features, None), [mlp.down])
    return {k: tuple(v) for k, v in losses.items()}


def quantize_awq(model: Decoder, windows: Tensor, quant: QuantConfig, batch_size: int = 8) -> dict[str, Any]:
    """Scale (AWQ) and round every block linear of `model` to its QuantLinear, in place -> summary."""
    bits, size = quant.bits, quant.groups(quant.bits)
    rtn.check_groups(model, linear_names(model), size)
    if quant.head:
        raise LmforgeError("method=awq quantizes the blocks only; drop quant.head=true (or use method=int4)")
    losses: dict[str, list[float]] = {}

    def visit(i: int, block: nn.Module, xs: list[Tensor]) -> None:
        start = time.perf_counter()
        found = scale_block(model, block, xs, quant)
        for group, (loss, rtn_loss) in found.items():
            losses[f"layers.{i}.{group}"] = [loss, rtn_loss]
        for name, linear in [(n, m) for n, m in block.named_modules() if type(m) is nn.Linear]:
            codes, scales, zeros = rtn.quantize_weight(
                linear.weight, bits, size, quant.symmetric, quant.observer_for("awq")
            )
            parent, _, attr = name.rpartition(".")
            layer = QuantLinear.from_codes(codes, scales, zeros, bits, linear.bias)
            setattr(block.get_submodule(parent), attr, layer.to(linear.weight.device))
        awq, plain = sum(v[0] for v in found.values()), sum(v[1] for v in found.values())
        print(
            f"awq block {i}: output mse {awq:.3g} (rtn {plain:.3g}) in {time.perf_counter() - start:.1f} s", flush=True
        )

    run_blocks(model, block_inputs(model, windows, batch_size), visit)
    return {
        "output_mse": sum(v[0] for v in losses.values()),
        "rtn_output_mse": sum(v[1] for v in losses.values()),
        "group_output_mse": losses,
    }


def compress(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor, run: Run) -> Compressed:
    """main.METHODS["awq"]."""

    return Compressed(model, quantize_awq(model, windows, cfg.quant))
