"""Round-to-nearest weight quantization: int8 with one scale per output channel, int4 with a scale (and a zero point,
asymmetric) per group of input columns. The grid is compressed-tensors' (llm-compressor's): symmetric scales are
absmax / ((2^bits - 1) / 2) with codes centred on 2^(bits-1); asymmetric ranges always include zero.

A group's range comes from an observer: minmax covers every weight; mse shrinks the range in steps of 1/grid and keeps
the shrink with the least sum |w - w_hat|^norm (llm-compressor's MSE observer, same defaults), clipping a few outliers
to round the rest more finely."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.compress.modules import QuantLinear, linear_names
from lmforge.errors import LmforgeError

OBSERVERS = ("minmax", "mse")
MSE_GRID, MSE_MAXSHRINK, MSE_PATIENCE, MSE_NORM = 100, 0.2, 5, 2.4


def range_params(low: Tensor, high: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The grid covering [low, high] (rows,), low <= 0 <= high -> (scale, zero) (rows,)."""
    top = 2**bits - 1
    if symmetric:
        scale = torch.maximum(-low, high) / (top / 2)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        scale = (high - low) / top
        zero = torch.round(-low / scale.clamp(min=1e-12)).clamp(0, top)
    return scale.clamp(min=1e-12), zero


def group_params(w: Tensor, bits: int, symmetric: bool, observer: str = "minmax") -> tuple[Tensor, Tensor]:
    """w (rows, cols): each row one group -> (scale, zero) (rows,), the grid the observer picks for it."""
    low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale, zero = range_params(low, high, bits, symmetric)
    if observer == "minmax":
        return scale, zero
    if observer != "mse":
        raise LmforgeError(f"observer {observer!r} is not one of {', '.join(OBSERVERS)}")
    best = torch.full_like(scale, float("inf"))
    stale = 0
    for step in range(int(MSE_MAXSHRINK * MSE_GRID)):
        shrink = 1 - step / MSE_GRID
        s, z = range_params(shrink * low, shrink * high, bits, symmetric)
        w_hat = (quantize(w, s[:, None], z[:, None], bits) - z[:, None]) * s[:, None]
        error = (w_hat - w).abs_().pow_(MSE_NORM).sum(dim=1)
        better = error < best
        if better.any():
            stale = 0
            best = torch.where(better, error, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        else:
            stale += 1
            if stale >= MSE_PATIENCE:
                break
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """The codes of w on the grid (scale, zero), broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize_weight(
    w: Tensor, bits: int, group_size: int, symmetric: bool, observer: str = "minmax"
) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in) -> (codes (out, in), scales (out, groups), zeros (out, groups)) by round to nearest."""
    out_features, in_features = w.shape
    size = group_size or in_features
    if in_features % size:
        raise LmforgeError(
            f"quant.group_size={group_size} does not divide a layer's {in_features} inputs; choose a divisor "
            "(or 0 for one scale per output channel)"
        )
    groups = w.float().reshape(-1, size)  # (out * groups, size)
    scale, zero = group_params(groups, bits, symmetric, observer)
    codes = quantize(groups, scale[:, None], zero[:, None], bits).reshape(out_features, in_features)
    return codes, scale.reshape(out_features, -1), zero.reshape(out_features, -1)


def check_groups(model: torch.nn.Module, names: list[str], group_size: int) -> None:
    """Refuse, before anything is changed, a group size that does not divide every named layer's inputs."""
    for name in names:
        width = model.get_submodule(name).in_features
        if group_size and width % group_size:
            raise LmforgeError(
                f"quant.group_size={group_size} does not divide {name}'s {width} inputs; choose a divisor of every "
                "layer's input width (or 0 for one scale per output channel)"
            )


@torch.no_grad()
def quantize_rtn(
    model: torch.nn.Module, bits: int, group_size: int, symmetric: bool, head: bool = False, observer: str = "minmax"
) -> None:
    """Replace every block linear (and the LM head with head=True) by its round-to-nearest QuantLinear, in place."""
    names = linear_names(model, head)
    check_groups(model, names, group_size)
    for name in names:
        linear = model.get_submodule(name)
        codes, scales, zeros = quantize_weight(linear.weight, bits, group_size, symmetric, observer)
        layer = QuantLinear.from_codes(codes, scales, zeros, bits, linear.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
