"""GPTQ (Frantar et al., 2022): each block linear quantized column by column, the rounding error of every column
spread over the columns not yet quantized through the Cholesky factor of the inverse Hessian of its calibration
inputs, in lazy batches of quant.block_size columns; blocks in order, each seeing the compressed blocks before it.

    lmforge compress tiny method=gptq calibration.path=text.txt quant.group_size=128 run.name=tiny-gptq
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lmforge.compress import rtn
from lmforge.compress.calibration import block_inputs, block_linears, hessians, run_blocks
from lmforge.compress.compressed import Compressed
from lmforge.compress.modules import QuantLinear, linear_names
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.compress.config import CompressConfig, QuantConfig
    from lmforge.models import Decoder
    from lmforge.run import Run


def inverse_hessian_factor(h: Tensor, damp: float) -> Tensor:
    """H (in, in), dead columns already set to H[i,i] = 1 -> the upper Cholesky factor of (H + damp mean(diag) I)^-1."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        raise LmforgeError(
            "a layer's Hessian is not positive definite even after damping; raise quant.damp (e.g. 0.1)"
        ) from None
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def quantize_layer(
    w: Tensor,
    h: Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    observer: str = "minmax",
) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in), h (in, in) = 2/n X^T X -> (codes (out, in), scales, zeros (out, groups)), computed in h's dtype.

    Without act_order a group's (scale, zero) come from its columns as they stand, updated, when its first column is
    reached (GPTQ's paper). With act_order columns go by decreasing diag(H) and every group's grid is fixed up front
    from the weights before any update (AutoGPTQ's static_groups), so groups keep their place in the column order.
    """
    rows, cols = w.shape
    size = group_size or cols
    w, h = w.to(h.dtype).clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = None
    if act_order:
        static = rtn.group_params(w.reshape(-1, size), bits, symmetric, observer)  # each (rows * groups,)
        static = tuple(p.reshape(rows, -1) for p in static)
        order = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, order], h[order][:, order]
    else:
        order = torch.arange(cols, device=w.device)
    factor = inverse_hessian_factor(h, damp)
    codes = torch.zeros_like(w)
    scales = torch.zeros(rows, cols // size, dtype=w.dtype, device=w.device)
    zeros = torch.zeros_like(scales)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, f1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype, device=w.device), factor[i1:i2]
        for i in range(i2 - i1):
            col = int(order[i1 + i])
            g = col // size
            if static is not None:
                scales[:, g], zeros[:, g] = static[0][:, g], static[1][:, g]
            elif col % size == 0:
                # the group's columns as they stand now: those in this batch updated, those after it still owe the
                # batch's pending lazy update
                later = w[:, i2 : col + size] - err1[:, :i] @ factor[i1 : i1 + i, i2 : col + size]
                scales[:, g], zeros[:, g] = rtn.group_params(
                    torch.cat([w1[:, i : i + size], later], 1), bits, symmetric, observer
                )
            scale, zero = scales[:, g], zeros[:, g]
            q = rtn.quantize(w1[:, i], scale, zero, bits)
            codes[:, i1 + i] = q
            err = (w1[:, i] - (q - zero) * scale) / f1[i, i1 + i]
            w1[:, i:] -= err[:, None] * f1[i, i1 + i : i2][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ factor[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return codes, scales, zeros


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """Mean squared error of the layer's outputs on its calibration inputs: trace(D H D^T) / (2 out), D = w - w_hat."""
    d = (w - w_hat).to(h.dtype)
    return float(((d @ h) * d).sum() / (2 * w.shape[0]))


def quantize_gptq(model: Decoder, windows: Tensor, quant: QuantConfig, batch_size: int = 8) -> dict[str, Any]:
    """Replace every block linear of `model` by its GPTQ QuantLinear, in place -> summary (per-layer output MSE)."""
    bits, size = quant.bits, quant.groups(quant.bits)
    rtn.check_groups(model, linear_names(model), size)
    if quant.head:
        raise LmforgeError("method=gptq quantizes the blocks only; drop quant.head=true (or use method=int4)")
    errors: dict[str, float] = {}

    def visit(i: int, block, xs: list[Tensor]) -> None:
        start = time.perf_counter()
        names = block_linears(block)
        hs = hessians(model, block, names, xs)
        for name in names:
            linear = block.get_submodule(name)
            w = linear.weight.detach().float()
            codes, scales, zeros = quantize_layer(
                w,
                hs[name],
                bits,
                size,
                quant.symmetric,
                quant.act_order,
                quant.damp,
                quant.block_size,
                quant.observer_for("gptq"),
            )
            layer = QuantLinear.from_codes(codes, scales.float(), zeros.float(), bits, linear.bias)
            errors[f"layers.{i}.{name}"] = output_error(w, layer.weight, hs[name])
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, layer.to(w.device))
        total = sum(v for k, v in errors.items() if k.startswith(f"layers.{i}."))
        print(f"gptq block {i}: output mse {total:.3g} in {time.perf_counter() - start:.1f} s", flush=True)

    run_blocks(model, block_inputs(model, windows, batch_size), visit)
    return {"output_mse": sum(errors.values()), "layer_output_mse": errors}


def compress(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor, run: Run) -> Compressed:
    """main.METHODS["gptq"]."""

    return Compressed(model, quantize_gptq(model, windows, cfg.quant))
