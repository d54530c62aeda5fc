"""Checkpoint I/O of the pre-training loop: DCP shards that resume on another world size, a single-file export for
the rest of lmforge, and ZeRO-1's consolidated single file."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lmforge.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    prune_checkpoints,
    read_state,
    save_checkpoint,
)
from lmforge.errors import LmforgeError
from lmforge.run import Run
from lmforge.train import dcp, parallel
from lmforge.train.tensor_parallel import fused_rows

if TYPE_CHECKING:
    from lmforge.train.pretrain import PretrainConfig


class Checkpointer:
    """Every rank writes its shards of the model and optimizer with DCP (train/dcp.py)
    to runs/<name>/dcp/step_N, which resumes on any world size whose global batch is the same; rank 0 exports the
    weights to checkpoints/step_N/{model.safetensors, model.json} for generate, export and serve. ZeRO-1 writes
    one file of weights and consolidated optimizer state instead, resumable at its own world size only."""

    def __init__(self, run: Run, cfg: PretrainConfig, dp_size: int, scaler: torch.amp.GradScaler, zero1: bool):
        self.run, self.cfg, self.dp_size, self.scaler, self.zero1 = run, cfg, dp_size, scaler, zero1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        tp = cfg.parallel.tp
        self.rows = (fused_rows(cfg.model), tp) if tp > 1 else None
        self.global_batch = cfg.train.batch_size * dp_size

    def save(self, step: int, model, optimizers, schedulers, loader) -> None:
        """Every rank calls this."""
        run, keep_last = self.run, self.cfg.train.keep_last
        state = {"loader": loader.state_dict(), "dp_size": self.dp_size, "global_batch": self.global_batch}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        if self.zero1:
            optimizer_states = parallel.optimizer_state_dicts(optimizers, self.rank)  # gathers the shards on rank 0
            if self.rank == 0:
                trainer = {
                    "optimizers": optimizer_states,
                    "schedulers": [sched.state_dict() for sched in schedulers],
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                }
                state["world_size"] = dist.get_world_size()
                save_checkpoint(run.path, step, model, state=state, trainer=trainer, keep_last=keep_last)
            return
        saved = dcp.save_dcp(run.path, step, model, optimizers, schedulers, state, keep_last, self.rows)
        if self.rank == 0:  # reads the shards back in one process: no collective, no whole copy on the other ranks
            dcp.export_safetensors(saved, run.file(f"checkpoints/step_{step:06d}"))
            prune_checkpoints(run.path, keep_last)
        parallel.barrier()

    def resume(self, model, optimizers, schedulers, loader, world_size: int) -> int:
        """Load the newest checkpoint into the (already sharded) model, optimizers, schedulers and loader; return its
        step. Every rank calls this."""
        path = self.run.path
        newest = latest_checkpoint(path) if self.zero1 else dcp.latest_dcp(path)
        if newest is None:
            other = dcp.latest_dcp(path) if self.zero1 else latest_checkpoint(path)
            if other is not None and self.zero1:
                raise LmforgeError(
                    f"{other} is a DCP checkpoint, which parallel.zero=1 on several processes cannot read; resume "
                    f"with another parallel.zero"
                )
            if other is not None and (other / "trainer.pt").exists():
                raise LmforgeError(
                    f"{other} was written under parallel.zero=1 on several processes; resume with parallel.zero=1 at "
                    f"its world size"
                )
            raise LmforgeError(f"--resume given but {path}/checkpoints holds no checkpoint; drop --resume to start")
        if self.zero1:
            state = self._load_zero1(newest, model, optimizers, schedulers, world_size)
        else:
            state = dcp.load_dcp(newest, model, optimizers, schedulers, self.rows)
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise LmforgeError(
                f"{newest} trained on {state['global_batch']} sequences per micro-batch, this run on "
                f"{self.global_batch} (train.batch_size x dp ranks); keep the global batch to resume exactly"
            )
        # each dp rank's cursor counts its own windows of one round-robin deal: as many were dealt to every rank, so
        # the global position is cursor x dp ranks, which another dp size deals out from the same place
        saved_dp, position = state.get("dp_size", state.get("world_size", 1)), dict(state["loader"])
        position["cursor"] = position["cursor"] * saved_dp // self.dp_size
        loader.load_state_dict(position)
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.rank == 0:
            print(f"resumed from {newest} at step {state['step']}", flush=True)
        return int(state["step"])

    def _load_zero1(self, ckpt, model, optimizers, schedulers, world_size: int) -> dict:
        load_weights(model, ckpt / "model.safetensors")
        state = read_state(ckpt)
        if state.get("world_size", 1) != world_size:
            raise LmforgeError(
                f"{ckpt} was written by {state.get('world_size', 1)} processes under parallel.zero=1, not "
                f"{world_size}; resume with --nproc-per-node {state.get('world_size', 1)}"
            )
        trainer = load_trainer_state(ckpt)
        if len(trainer["optimizers"]) != len(optimizers):
            raise LmforgeError(f"{ckpt} was written with another train.optimizer; resume with the same config")
        for opt, sd in zip(optimizers, trainer["optimizers"], strict=True):
            opt.load_state_dict(sd)
        for sched, sd in zip(schedulers, trainer["schedulers"], strict=True):
            sched.load_state_dict(sd)
        torch.set_rng_state(trainer["torch_rng"])
        if trainer["cuda_rng"]:
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        return state
