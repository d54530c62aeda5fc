"""Checkpoint I/O of the pre-training loop: DCP shards that resume on another world size and layout, and a
single-file export for the rest of lmforge."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lmforge.checkpoint import prune_checkpoints
from lmforge.errors import LmforgeError
from lmforge.run import Run
from lmforge.train import dcp, parallel
from lmforge.train.tensor_parallel import fused_rows

if TYPE_CHECKING:
    from lmforge.train.pretrain import PretrainConfig


class Checkpointer:
    """Every rank writes its shards of the model and of the optimizer state it steps with DCP (train/dcp.py) to
    runs/<name>/dcp/step_N, which resumes on any world size and layout whose global batch is the same; rank 0 exports
    the weights to checkpoints/step_N/{model.safetensors, model.json} for generate, export and serve."""

    def __init__(self, run: Run, cfg: PretrainConfig, dp_size: int, scaler: torch.amp.GradScaler):
        self.run, self.cfg, self.dp_size, self.scaler = run, cfg, dp_size, scaler
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
        # ZeRO-1: each rank writes the moments of its own share of the parameters, no gathering
        local = parallel.local_optimizers(optimizers)
        saved = dcp.save_dcp(run.path, step, model, local, schedulers, state, keep_last, self.rows)
        if self.rank == 0:  # reads the shards back in one process: no collective, no whole copy on the other ranks
            dcp.export_safetensors(saved, run.file(f"checkpoints/step_{step:06d}"))
            prune_checkpoints(run.path, keep_last)
        parallel.barrier()

    def resume(self, model, optimizers, schedulers, loader) -> int:
        """Load the newest checkpoint into the (already sharded) model, optimizers, schedulers and loader; return its
        step. Every rank calls this."""
        path = self.run.path
        newest = dcp.latest_dcp(path)
        if newest is None:
            raise LmforgeError(f"--resume given but {path}/dcp holds no checkpoint; drop --resume to start")
        state = dcp.load_dcp(newest, model, parallel.local_optimizers(optimizers), schedulers, self.rows)
        parallel.pull_hyperparameters(optimizers)
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
