"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
each layer's mask is chosen a block of columns at a time by w^2 / [H^-1]_jj^2 (diagonal of the inverse Hessian's
Cholesky factor), and every pruned weight's error is spread over the row's later weights by the optimal brain
surgeon update, with the blocks of the model pruned in order on the outputs of the pruned blocks before them.

    lmforge compress smol method=sparsegpt prune.sparsity=0.5 calibration.path=text.txt run.name=smol-sparsegpt
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.compress.calibration import block_inputs, block_linears, hessians, run_blocks
from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.prune import lowest, sparsity_summary
from lmforge.models import Decoder
from lmforge.run import Run


def inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1: row j of U is the inverse Hessian's row j
    once columns < j are eliminated, over sqrt of its pivot."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@torch.no_grad()
def sparsegpt_weight(
    weight: Tensor, H: Tensor, sparsity: float, pattern: tuple[int, int] | None, block_size: int, damp: float
) -> Tensor:
    """weight (out, in) and its Hessian H (in, in) -> the pruned weight (float32): sparsity of each block of columns
    (or M - N of every M inputs with pattern (N, M)) set to zero, the rest updated to make up for it."""
    W = weight.float().clone()
    H = H.float().clone()
    dead = H.diagonal() == 0  # inputs never seen: their weights cannot matter, prune them
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_cholesky(H, damp)
    rows, cols = W.shape
    if pattern:  # N:M groups must not straddle two blocks
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        d = U1.diagonal()
        mask = None if pattern else lowest(W1.square() / d.square(), int(W1.numel() * sparsity))
        for i in range(i2 - i1):
            if pattern and i % pattern[1] == 0:
                n, m = pattern
                if mask is None:
                    mask = torch.zeros_like(W1, dtype=torch.bool)
                score = W1[:, i : i + m].square() / d[i : i + m].square()
                mask[:, i : i + m] = lowest(score, m - n, dim=1)
            w = W1[:, i]
            err = torch.where(mask[:, i], w, 0.0) / d[i]  # (out,): the pruned weights over their pivot
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # zeroes the pruned w, moves the rest of the row
            W1[:, i].masked_fill_(mask[:, i], 0.0)  # exactly zero, not a rounding residue
            errors[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return W


@torch.no_grad()
def prune_sparsegpt(model: Decoder, cfg: CompressConfig, windows: Tensor) -> None:
    def visit(i: int, block: nn.Module, xs: list[Tensor]) -> None:
        names = block_linears(block)
        for name, H in hessians(model, block, names, xs).items():
            linear = block.get_submodule(name)
            pruned = sparsegpt_weight(
                linear.weight, H, cfg.prune.sparsity, cfg.prune.nm(), cfg.quant.block_size, cfg.quant.damp
            )
            linear.weight.copy_(pruned)

    run_blocks(model, block_inputs(model, windows), visit)


def sparsegpt(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor, run: Run):

    prune_sparsegpt(model, cfg, windows)
    return Compressed(model, sparsity_summary(model))
