"""Unstructured and N:M pruning of the blocks' linear layers by magnitude (the smallest |w| of each layer) or by Wanda
(Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models": score |W_ij| * ||X_j||_2 over
the calibration inputs, compared within each output row). The pruned model is a plain Decoder holding zeros.

    lmforge compress smol method=wanda prune.sparsity=0.5 calibration.path=text.txt run.name=smol-wanda
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.compress.calibration import block_inputs, block_linears, capture, run_blocks
from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.modules import linear_names
from lmforge.models import Decoder
from lmforge.run import Run


def lowest(score: Tensor, count: int, dim: int | None = None) -> Tensor:
    """A boolean mask of score's `count` smallest entries: over the whole tensor (dim=None) or along `dim`."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if dim is None:
        mask.view(-1)[score.flatten().topk(count, largest=False).indices] = True
    else:
        mask.scatter_(dim, score.topk(count, dim=dim, largest=False).indices, True)
    return mask


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """(out, in) scores -> the mask of the M - N lowest scores in every group of M consecutive inputs of a row."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # (out, in / M, M)
    return lowest(groups, m - n, dim=2).reshape(rows, cols)


def prune_mask(score: Tensor, cfg: CompressConfig, per_row: bool) -> Tensor:
    """The weights to zero: N:M groups when prune.pattern is set, else prune.sparsity of each row (per_row) or of
    the whole matrix."""
    pattern = cfg.prune.nm()
    if pattern:
        return nm_mask(score, *pattern)
    if per_row:
        return lowest(score, int(score.shape[1] * cfg.prune.sparsity), dim=1)
    return lowest(score, int(score.numel() * cfg.prune.sparsity))


def sparsity_summary(model: Decoder) -> dict[str, float]:
    """Achieved sparsity (share of zero weights) of the block linears: per layer type and over all of them."""
    zeros, sizes = defaultdict(int), defaultdict(int)
    for name in linear_names(model):
        weight = model.get_submodule(name).weight
        kind = name.split(".", 2)[2]  # layers.3.attn.qkv -> attn.qkv
        zeros[kind] += int((weight == 0).sum())
        sizes[kind] += weight.numel()
    summary = {f"sparsity_{kind}": round(zeros[kind] / sizes[kind], 6) for kind in zeros}
    summary["sparsity"] = round(sum(zeros.values()) / max(1, sum(sizes.values())), 6)
    return summary


@torch.no_grad()
def prune_magnitude(model: Decoder, cfg: CompressConfig) -> None:
    # one threshold per matrix: q, k and v (and gate and up) are fused here, so they share theirs
    for name in linear_names(model):
        weight = model.get_submodule(name).weight
        weight[prune_mask(weight.abs().float(), cfg, per_row=False)] = 0


@torch.no_grad()
def prune_wanda(model: Decoder, cfg: CompressConfig, windows: Tensor) -> None:
    """Blocks in order, each seeing the outputs of the pruned blocks before it (Wanda's sequential variant); within a
    block every linear is scored on the block's unpruned activations."""

    def visit(i: int, block: nn.Module, xs: list[Tensor]) -> None:
        names = block_linears(block)
        squares: dict[str, Tensor] = {}

        def record(name: str, x: Tensor) -> None:
            squares[name] = squares.get(name, 0) + x.float().square().sum(dim=0)  # (in,)

        with capture(block, names, record):
            for x in xs:
                block(x, model.positions, torch.arange(x.shape[1], device=x.device))
        for name in names:
            weight = block.get_submodule(name).weight
            score = weight.abs().float() * squares[name].sqrt()[None, :]  # (out, in)
            weight[prune_mask(score, cfg, per_row=True)] = 0

    run_blocks(model, block_inputs(model, windows), visit)


def magnitude(cfg: CompressConfig, model: Decoder, tokenizer, windows, run: Run):

    prune_magnitude(model, cfg)
    return Compressed(model, sparsity_summary(model))


def wanda(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor, run: Run):

    prune_wanda(model, cfg, windows)
    return Compressed(model, sparsity_summary(model))
