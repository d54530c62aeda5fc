"""Helper of test_dcp.py: a tiny model trained on fixed random batches, saved and loaded through lmforge.train.dcp.

Under torchrun (2 ranks, gloo) `python dcp_worker.py {save,load} OUT` writes full state dicts (rank 0) to OUT for the
test to compare; the test imports the same functions for its one-process side.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lmforge.models import ModelConfig, build_model
from lmforge.train.config import TrainConfig
from lmforge.train.dcp import load_dcp, save_dcp
from lmforge.train.optim import build_optimizers
from lmforge.train.schedule import build_schedulers

CFG = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
TRAIN = TrainConfig(steps=8, lr=1e-2, warmup_steps=2, optimizer="adamw")
GLOBAL_BATCH = 8


def build(sharding: str = "none", cfg: ModelConfig = CFG):
    """(module to train, optimizers, schedulers); sharding: none (one process), ddp or fsdp (FSDP2 per block)."""
    model = build_model(cfg, seed=0)
    train_module: nn.Module = model
    if sharding == "ddp":
        train_module = DistributedDataParallel(model)
    elif sharding == "fsdp":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizers = build_optimizers(model, TRAIN)
    return train_module, optimizers, build_schedulers(optimizers, TRAIN)


def train(module: nn.Module, optimizers, schedulers, start: int, stop: int) -> None:
    """Steps start..stop-1; step k trains on batch k, each rank on its slice of the global batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    for step in range(start, stop):
        tokens = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, CFG.max_seq_len + 1), generator=_gen(step))
        tokens = tokens.chunk(world)[rank]
        module(tokens[:, :-1], tokens[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in schedulers:
            sched.step()


def full_state(module: nn.Module, optimizers) -> dict:
    """Whole model and optimizer state dicts keyed by parameter name, on CPU in rank 0 (a collective under FSDP)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(module, optimizers, options=options)
    return {"model": model_sd, "optim": optim_sd}


def _gen(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + step)


def _dump(out: Path, name: str, module: nn.Module, optimizers) -> None:
    state = full_state(module, optimizers)
    if dist.get_rank() == 0:
        torch.save(state, out / f"{name}.pt")


def save_mode(out: Path) -> None:
    """FSDP: train 0..2, save; train on to 4 (the uninterrupted run). A fresh FSDP and a DDP model resume from step 2
    and train to 4; DDP saves its step 4."""
    module, optimizers, schedulers = build("fsdp")
    train(module, optimizers, schedulers, 0, 2)
    save_dcp(out / "fsdp", 2, module, optimizers, schedulers, state={"note": "fsdp"})
    _dump(out, "fsdp_step2", module, optimizers)
    train(module, optimizers, schedulers, 2, 4)
    _dump(out, "fsdp_step4", module, optimizers)
    for sharding in ("fsdp", "ddp"):
        module, optimizers, schedulers = build(sharding)
        load_dcp(out / "fsdp/dcp/step_000002", module, optimizers, schedulers)
        _dump(out, f"{sharding}_loaded_step2", module, optimizers)
        train(module, optimizers, schedulers, 2, 4)
        _dump(out, f"{sharding}_resumed_step4", module, optimizers)
    save_dcp(out / "ddp", 4, module, optimizers, schedulers)


def load_mode(out: Path) -> None:
    """FSDP loads the one-process checkpoint of step 2 and trains to 4."""
    module, optimizers, schedulers = build("fsdp")
    load_dcp(out / "single/dcp/step_000002", module, optimizers, schedulers)
    _dump(out, "fsdp_from_single_step2", module, optimizers)
    train(module, optimizers, schedulers, 2, 4)
    _dump(out, "fsdp_from_single_step4", module, optimizers)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    {"save": save_mode, "load": load_mode}[sys.argv[1]](Path(sys.argv[2]))
    dist.barrier()
    dist.destroy_process_group()
