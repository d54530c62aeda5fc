"""Parallelism applied from outside the model over one DeviceMesh (pp, dp, tp): data parallelism by DDP, ZeRO-1
(Rajbhandari et al., 2020) through ZeroRedundancyOptimizer, ZeRO-2/3 through FSDP2, tensor parallelism
(train/tensor_parallel.py) and pipeline parallelism (train/pipeline.py).

Run: `torchrun --nproc-per-node N -m lmforge pretrain ... [parallel.tp=2] [parallel.pp=2] [parallel.zero=1]`; one
process without torchrun needs no change.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig
from lmforge.models.decoder import Block
from lmforge.train.tensor_parallel import apply_tensor_parallel, deinterleave_state_dict


@dataclass
class ParallelConfig:
    dp: int = 0
    """Data-parallel ranks (0: world size / (tp * pp)); dp * tp * pp must equal the world size."""
    tp: int = 1
    """Tensor-parallel ranks (Megatron column/row sharding plus sequence parallelism); must divide the heads."""
    pp: int = 1
    """Pipeline stages, each a consecutive run of layers; at most model.n_layers."""
    zero: Literal[0, 1, 2, 3] = 0
    """Over the dp ranks: 0 DDP (all replicated); 1 ZeRO-1, DDP + ZeroRedundancyOptimizer (optimizer state
    sharded); 2 FSDP2 without resharding after forward (gradients and optimizer state sharded; parameters stay
    gathered from forward to backward, as ZeRO-2 keeps them whole); 3 FSDP2 fully_shard (parameters too)."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """Pipeline schedule: gpipe (all forwards, then all backwards) or 1f1b (at most pp micro-batches in flight)."""
    microbatches: int = 0
    """Pipeline micro-batches per step (0: train.grad_accum); they split the step's batch_size * grad_accum rows."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto: nccl on CUDA, gloo on CPU."""
    cpu_offload: bool = False
    """With parallel.zero=2/3 on GPUs: keep FSDP's parameter shards, gradients and AdamW state in CPU memory (copied
    to the GPU per block for forward and backward; the optimizer steps on the CPU), so a model larger than the GPUs'
    memory trains. On CPU devices the same config runs unchanged and saves nothing: everything is in CPU memory."""

    def validate(self) -> None:
        for name in ("dp", "microbatches"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"parallel.{name}={getattr(self, name)} must be >= 0 (0: derived)")
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if self.cpu_offload and self.zero < 2:
            raise LmforgeError(
                f"parallel.cpu_offload=true offloads FSDP's shards, but parallel.zero={self.zero} does not use FSDP; "
                "set parallel.zero=2 or 3"
            )
        if self.microbatches and self.pp == 1:
            raise LmforgeError(
                f"parallel.microbatches={self.microbatches} splits a pipeline's step, but parallel.pp=1; set "
                f"parallel.pp>1 or use train.grad_accum"
            )

    def check_model(self, mc: ModelConfig) -> None:
        """Layouts the model's shapes rule out (before anything runs)."""
        if mc.n_heads % self.tp or mc.n_kv_heads % self.tp:
            raise LmforgeError(
                f"parallel.tp={self.tp} must divide model.n_heads={mc.n_heads} and model.n_kv_heads={mc.n_kv_heads} "
                f"(each rank holds whole heads); pick a tp that divides both"
            )
        if mc.max_seq_len % self.tp:
            raise LmforgeError(
                f"parallel.tp={self.tp} must divide model.max_seq_len={mc.max_seq_len} (sequence parallelism splits "
                f"the positions)"
            )
        if self.pp > mc.n_layers:
            raise LmforgeError(
                f"parallel.pp={self.pp} is more than model.n_layers={mc.n_layers}; use parallel.pp <= {mc.n_layers}"
            )
        if self.pp > 1 and mc.tie_embeddings:
            raise LmforgeError(
                "parallel.pp>1 with model.tie_embeddings=true would split the shared matrix over the first and last "
                "stage; set model.tie_embeddings=false or parallel.pp=1"
            )

    def mesh_shape(self, world_size: int) -> tuple[int, int, int]:
        """(pp, dp, tp), checked against the world size."""
        launch = "; launch dp x tp x pp processes (torchrun --nproc-per-node N)"
        if not self.dp and world_size % (self.tp * self.pp):
            raise LmforgeError(
                f"parallel.tp={self.tp} x parallel.pp={self.pp} = {self.tp * self.pp} does not divide the {world_size} "
                f"processes; choose tp and pp whose product divides {world_size}{launch}"
            )
        dp = self.dp or world_size // (self.tp * self.pp)
        if dp * self.tp * self.pp != world_size:
            raise LmforgeError(
                f"parallel.dp={dp} x parallel.tp={self.tp} x parallel.pp={self.pp} = {dp * self.tp * self.pp} is not "
                f"the {world_size} processes; choose values whose product is {world_size} (parallel.dp=0 derives "
                f"dp){launch}"
            )
        if dp > 1 and (self.tp > 1 or self.pp > 1) and self.zero < 2:
            raise LmforgeError(
                f"parallel.dp={dp} with parallel.tp={self.tp} / parallel.pp={self.pp} needs parallel.zero=2 or 3 (FSDP "
                f"over the dp ranks); DDP (zero 0 and 1) takes neither DTensor parameters nor a pipeline's "
                f"per-micro-batch backwards"
            )
        if self.cpu_offload and dp == 1:
            raise LmforgeError(
                "parallel.cpu_offload=true offloads FSDP's shards, but this layout has 1 data-parallel rank (no "
                f"FSDP); launch more processes than tp x pp = {self.tp * self.pp}"
            )
        return self.pp, dp, self.tp


def init_distributed(cfg: ParallelConfig, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, device) without them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        cfg.mesh_shape(1)
        return 0, 1, device
    cfg.mesh_shape(world_size)  # before any process group exists, so a bad layout exits cleanly on every rank
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


def build_mesh(cfg: ParallelConfig, world_size: int, device: torch.device) -> DeviceMesh | None:
    """The (pp, dp, tp) mesh; None on one process."""
    if world_size == 1:
        return None
    return init_device_mesh(device.type, cfg.mesh_shape(world_size), mesh_dim_names=("pp", "dp", "tp"))


def dp_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This rank's place among the data-parallel replicas, which read different batches; tp and pp peers read the
    same one."""
    return (0, 1) if mesh is None else (mesh["dp"].get_local_rank(), mesh["dp"].size())


def destroy() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallelize(
    model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh | None, mc: ModelConfig, ac: str = "none", ac_every: int = 1
) -> nn.Module:
    """Tensor parallelism, then activation checkpointing (`ac`: none, full or selective every `ac_every`-th block),
    then data parallelism; returns the module to run (DDP's wrapper, or `model` itself changed in place)."""
    if mesh is not None and cfg.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], mc)
    checkpoint_blocks(model, ac, ac_every)
    if mesh is None or mesh["dp"].size() == 1:
        return model
    dp = mesh["dp"]
    device = next(model.parameters()).device
    if cfg.zero < 2:
        # gradients go in 25 MB buckets (DDP's default), each all-reduced as soon as it fills, overlapping backward
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=dp.get_group()
        )
    # one FSDP unit per block, so only one block's full parameters live at a time; the root takes embed/norm/head.
    # ZeRO-2 keeps each unit's gathered parameters from forward to backward (no second all-gather), ZeRO-3 frees them
    reshard = cfg.zero == 3
    # pinned host memory speeds the copies to a GPU; on CPU devices the shards stay where they are
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else OffloadPolicy()
    for block in model.layers.children():
        fully_shard(block, mesh=dp, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=dp, reshard_after_forward=reshard, offload_policy=offload)
    return model


def checkpoint_blocks(model: nn.Module, policy: str, every: int) -> None:
    """Wrap blocks so backward recomputes their activations: every block (full) or blocks 0, k, 2k, ... (selective,
    k = `every`), by the block's index in the whole model (a pipeline stage keeps the global indices)."""
    if policy == "none":
        return
    step = 1 if policy == "full" else every
    chosen = {id(b) for name, b in model.layers.named_children() if int(name) % step == 0}
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block) and id(m) in chosen)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward of `model` on (x, y), parameters aside, each storage once.
    Checkpointed blocks keep theirs out of sight (their own saved-tensor hooks stash nothing), so this is what
    checkpointing saves."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return sum(kept.values())


def shard_optimizers(optimizers: list[torch.optim.Optimizer], cfg: ParallelConfig, mesh: DeviceMesh | None) -> list:
    """ZeRO-1: each optimizer rebuilt as a ZeroRedundancyOptimizer, so each dp rank keeps the state of (and steps)
    its share of the parameters and broadcasts them after the step."""
    if cfg.zero != 1 or mesh is None or mesh["dp"].size() == 1:
        return optimizers
    out = []
    for opt in optimizers:
        cls = type(opt)
        accepted = inspect.signature(cls).parameters
        defaults = {k: v for k, v in opt.defaults.items() if k in accepted}
        groups = [dict(g) for g in opt.param_groups]
        group = mesh["dp"].get_group()
        out.append(ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=group, **defaults))
    return out


def local_optimizers(optimizers: list[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """What each rank steps: under ZeRO-1 the optimizer of its own share of the parameters, else the optimizer."""
    return [opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt for opt in optimizers]


def pull_hyperparameters(optimizers: list[torch.optim.Optimizer]) -> None:
    """After a checkpoint was loaded into ZeRO-1's local optimizers: the wrapper's groups take the loaded learning
    rates (ZeroRedundancyOptimizer copies its own groups' onto the local optimizer before every step)."""
    for opt in optimizers:
        if isinstance(opt, ZeroRedundancyOptimizer):
            for outer, inner in zip(opt.param_groups, opt.optim.param_groups, strict=True):
                outer.update({k: v for k, v in inner.items() if k != "params"})


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: skip DDP's all-reduce unless `sync` (the last micro-batch).

    FSDP keeps reduce-scattering every micro-batch: skipping it would hold unsharded gradients, undoing ZeRO-2/3."""
    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float, cfg: ParallelConfig, mesh: DeviceMesh | None) -> torch.Tensor:
    """Clip the global gradient norm over every rank's shards and stages; return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.tp == 1 and cfg.pp == 1:
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
    # torch's clip stacks every norm into one tensor, which mixed placements (Shard(0), Shard(1), Replicate) and
    # plain tensors cannot share; so one norm per (mesh, placements) group, summed as squares
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        g = p.grad
        groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    square = sum(full_tensor(torch.nn.utils.get_total_norm(g)).float() ** 2 for g in groups.values())
    square = torch.as_tensor(square, dtype=torch.float32, device=params[0].device if params else "cpu")
    if cfg.pp > 1:
        dist.all_reduce(square, group=mesh["pp"].get_group())  # each stage holds other parameters
    norm = square.sqrt()
    coef = min(max_norm / (norm.item() + 1e-6), 1.0)
    for p in params:
        p.grad.mul_(coef)
    return norm


def mean_loss(t: torch.Tensor, cfg: ParallelConfig) -> torch.Tensor:
    """The step's loss averaged over the data-parallel ranks. Only the last pipeline stage holds a loss (the others
    add 0), and tp peers hold the same one."""
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)  # SUM then divide: gloo has no ReduceOp.AVG
    return t / (dist.get_world_size() // cfg.pp)


def rank_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards only)."""

    def size(tensors) -> int:
        local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor))

    params = list(model.parameters())
    inner = [getattr(opt, "optim", opt) for opt in optimizers]  # ZeRO-1 keeps its shard's state in .optim
    return {
        "param_bytes": size(params),
        "grad_bytes": size(p.grad for p in params),
        "optimizer_bytes": size(v for opt in inner for state in opt.state.values() for v in state.values()),
    }


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank calls it); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh, mc: ModelConfig) -> dict:
    """The whole model's state dict on CPU in rank 0, in the model's own layout (every rank must call it); other
    ranks get {}."""
    # with pipeline stages, the first rank of each stage gathers its stage, then rank 0 collects the stages
    options = StateDictOptions(full_state_dict=True, cpu_offload=cfg.pp == 1)
    sd = {k: v.cpu() for k, v in get_model_state_dict(model, options=options).items()}
    if cfg.tp > 1:
        sd = deinterleave_state_dict(sd, mc, cfg.tp)
    if cfg.pp == 1:
        return sd
    if mesh["dp"].get_local_rank() != 0 or mesh["tp"].get_local_rank() != 0:
        return {}
    stages = [None] * cfg.pp if dist.get_rank() == 0 else None
    dist.gather_object(model.own_state_dict(sd), stages, group=mesh["pp"].get_group(), group_dst=0)
    return {k: v for stage in stages for k, v in stage.items()} if stages else {}
