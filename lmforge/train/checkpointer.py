"""Checkpoint I/O of a training loop: DCP shards that resume on another world size and layout, and a single-file
export for the rest of lmforge."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from lmforge.checkpoint import prune_checkpoints
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig
from lmforge.run import Run, atomic_write
from lmforge.train import dcp, parallel
from lmforge.train.parallel import ParallelConfig
from lmforge.train.tensor_parallel import fused_rows


class Checkpointer:
    """Every rank writes its shards of the model and of the optimizer state it steps with DCP (train/dcp.py) to
    runs/<name>/dcp/step_N, which resumes on any world size and layout whose global batch is the same; rank 0 exports
    the weights to checkpoints/step_N/{model.safetensors, model.json} for generate, export and serve."""

    def __init__(
        self,
        run: Run,
        model: ModelConfig,
        layout: ParallelConfig,
        global_batch: int,
        dp_size: int,
        scaler: torch.amp.GradScaler,
        keep_last: int,
    ):
        """`global_batch`: sequences per micro-batch over the dp ranks, which a resume must keep to continue exactly;
        `keep_last`: checkpoints kept."""
        self.run, self.global_batch, self.dp_size = run, global_batch, dp_size
        self.scaler, self.keep_last = scaler, keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # tp's interleaved rows of fused matrices go back to the model's order in the checkpoint
        self.rows = (fused_rows(model), layout.tp) if layout.tp > 1 else None
        self.lineage: dict | None = None
        """The data the weights were trained on, written beside each exported checkpoint (data_lineage.json)."""

    def save(self, step: int, model, optimizers, schedulers, loader) -> None:
        """Every rank calls this."""
        run, keep_last = self.run, self.keep_last
        state = {"loader": loader.state_dict(), "dp_size": self.dp_size, "global_batch": self.global_batch}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        # ZeRO-1: each rank writes the moments of its own share of the parameters, no gathering
        local = parallel.local_optimizers(optimizers)
        saved = dcp.save_dcp(run.path, step, model, local, schedulers, state, keep_last, self.rows)
        if self.rank == 0:  # reads the shards back in one process: no collective, no whole copy on the other ranks
            exported = run.file(f"checkpoints/step_{step:06d}")
            dcp.export_safetensors(saved, exported)
            if self.lineage is not None:
                atomic_write(exported / "data_lineage.json", json.dumps(self.lineage, indent=2) + "\n")
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
