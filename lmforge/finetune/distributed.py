"""Data parallelism for fine-tuning under torchrun: every rank holds the whole tuned model (DDP over its trainable
weights, whatever the method), reads its share of each global batch of rows, and weights its loss by its share of the
batch's trained tokens, so N ranks of batch B train what one process of batch N * B does.

Run: `torchrun --nproc-per-node N -m lmforge finetune ... [parallel.dp=N]`; one process without torchrun needs no
change. Tensor and pipeline parallelism and FSDP are pre-training's (train/parallel.py) and are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import LmforgeError
from lmforge.finetune.template import IGNORE
from lmforge.finetune.tuned import Tuned
from lmforge.train import parallel
from lmforge.train.parallel import ParallelConfig


def check_layout(pc: ParallelConfig) -> None:
    """Refuse what fine-tuning does not run: anything but plain data parallelism."""
    if pc.tp > 1 or pc.pp > 1 or pc.zero or pc.cpu_offload:
        raise LmforgeError(
            f"lmforge finetune runs data parallel only (DDP over parallel.dp ranks), not parallel.tp={pc.tp} "
            f"parallel.pp={pc.pp} parallel.zero={pc.zero} parallel.cpu_offload={pc.cpu_offload}; set parallel.tp=1 "
            "parallel.pp=1 parallel.zero=0 parallel.cpu_offload=false"
        )


@dataclass
class Ranks:
    rank: int
    """This process among all (0 writes the run folder)."""
    size: int
    """Data-parallel ranks: the global batch is size x train.batch_size rows."""
    device: torch.device


def start(pc: ParallelConfig, device: torch.device) -> Ranks:
    """Join torchrun's process group (nothing on one process) and say where this rank stands."""
    rank, world_size, device = parallel.init_distributed(pc, device)
    dp_rank, dp_size = parallel.dp_rank_and_size(parallel.build_mesh(pc, world_size, device))
    assert dp_rank == rank and dp_size == world_size, "check_layout admits data parallelism only"
    return Ranks(rank, world_size, device)


class _Loss(nn.Module):
    """The tuned model's loss as a forward pass, which DDP needs to prepare its gradient all-reduce."""

    def __init__(self, tuned: Tuned):
        super().__init__()
        self.tuned = tuned

    def forward(self, x: Tensor, y: Tensor, segments: Tensor | None) -> Tensor:
        return self.tuned.loss(x, y, segments)


def loss_module(tuned: Tuned, ranks: Ranks) -> nn.Module:
    """What the loop calls for the training loss: DDP over the trainable weights on several ranks (frozen and NF4
    weights are identical everywhere, loaded from the same base, so buffers are not broadcast)."""
    module = _Loss(tuned)
    if ranks.size == 1:
        return module
    ids = [ranks.device] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def my_rows(batch: tuple[Tensor, ...], ranks: Ranks) -> tuple[Tensor, ...]:
    """This rank's consecutive share of a global batch (every rank's loader deals the same global batches)."""
    n = len(batch[0]) // ranks.size
    return tuple(t[ranks.rank * n : (ranks.rank + 1) * n] for t in batch)


def token_share(y: Tensor, ranks: Ranks) -> float:
    """The factor on this rank's mean loss that makes DDP's mean of the ranks' gradients the gradient of the mean
    over the global micro-batch's trained tokens: size x (this rank's trained tokens) / (all ranks' trained tokens)."""
    if ranks.size == 1:
        return 1.0
    counts = (y != IGNORE).sum().reshape(1).to(torch.float64)
    mine = counts.item()
    dist.all_reduce(counts)
    return ranks.size * mine / counts.item()


def step_totals(loss_sum: float, tokens: int, ranks: Ranks) -> tuple[float, int]:
    """(the step's loss averaged over the ranks, the non-padding tokens of all ranks)."""
    if ranks.size == 1:
        return loss_sum, tokens
    t = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)  # SUM: gloo has no AVG
    return t[0].item() / ranks.size, int(t[1].item())
