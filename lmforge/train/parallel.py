"""Data parallelism applied from outside the model: DDP, or ZeRO-3 (Rajbhandari et al., 2020) through FSDP2.

Run: `torchrun --nproc-per-node N -m lmforge pretrain ...`; one process without torchrun needs no change.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import LmforgeError


@dataclass
class ParallelConfig:
    dp_shard: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model and optimizer; fsdp: ZeRO-3, parameters, gradients and optimizer state
    sharded over the ranks (FSDP2 fully_shard per block, then the root)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto: nccl on CUDA, gloo on CPU."""


def init_distributed(cfg: ParallelConfig, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, device) without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LmforgeError("parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo or train.device=cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return rank, world_size, device


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallelize(model: nn.Module, cfg: ParallelConfig, world_size: int) -> nn.Module:
    """The module to train: `model` wrapped in DDP, or `model` itself sharded in place by FSDP2."""
    if world_size == 1:
        return model
    device = next(model.parameters()).device
    if cfg.dp_shard == "ddp":
        # gradients go in 25 MB buckets (DDP's default), each all-reduced as soon as it fills, overlapping backward
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world_size,))
    # one FSDP unit per block, so only one block's full parameters live at a time; the root takes embed/norm/head
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: skip DDP's all-reduce unless `sync` (the last micro-batch).

    FSDP keeps reduce-scattering every micro-batch: skipping it would hold unsharded gradients, undoing ZeRO-3."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)  # SUM then divide: gloo has no ReduceOp.AVG
    return t / dist.get_world_size()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU in rank 0 (every rank must call it); other ranks get {}."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
