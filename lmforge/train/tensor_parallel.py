"""Megatron tensor parallelism (Shoeybi et al., 2019) with sequence parallelism for the norms (Korthikanti et al.,
2022), applied from outside the model through DTensor's `parallelize_module`.

Column-parallel in-projections (qkv, gate_up/up) and row-parallel out-projections (proj, down) need one all-reduce
per sub-layer, split here into a reduce-scatter onto sequence shards (so norms and the residual stream hold T/tp
positions) and an all-gather back before the next in-projection. Embeddings are split by vocabulary rows; the
lm_head by vocabulary columns, its logits gathered so the loss is the plain one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lmforge.models import ModelConfig


def fused_rows(cfg: ModelConfig) -> dict[str, list[int]]:
    """Each fused projection's row blocks, by parameter-name suffix: q|k|v and gate|up."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"attn.qkv.weight": [q, kv, kv], "attn.qkv.bias": [q, kv, kv], "mlp.gate_up.weight": [cfg.hidden_dim] * 2}


def interleave(t: torch.Tensor, sizes: list[int], tp: int) -> torch.Tensor:
    """Rows [q | k | v] -> [q0 k0 v0 | q1 k1 v1 | ...]: a plain Shard(0) then hands rank r its own heads of each."""
    blocks = [b.chunk(tp) for b in t.split(sizes)]
    return torch.cat([b[r] for r in range(tp) for b in blocks])


def deinterleave(t: torch.Tensor, sizes: list[int], tp: int) -> torch.Tensor:
    """The inverse of `interleave`: back to the model's own [q | k | v] layout (for checkpoints)."""
    ranks = t.split([s // tp for s in sizes] * tp)  # rank-major: rank r's blocks are ranks[r*n : (r+1)*n]
    n = len(sizes)
    return torch.cat([torch.cat(ranks[i::n]) for i in range(n)])


def deinterleave_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, tp: int) -> dict[str, torch.Tensor]:
    rows = fused_rows(cfg)
    return {k: next((deinterleave(v, s, tp) for suf, s in rows.items() if k.endswith(suf)), v) for k, v in sd.items()}


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, cfg: ModelConfig) -> None:
    """Shard `model` (a Decoder or a pipeline stage holding some of its parts) over the 1-D `mesh` in place."""
    tp = mesh.size()
    blocks = list(model.layers.children())
    rows = fused_rows(cfg)
    # the rows are trained permuted: AdamW is elementwise and Muon's orthogonalisation commutes with a row permutation,
    # so only checkpoints (deinterleave_state_dict) need the model's own order back
    with torch.no_grad():
        for name, p in model.named_parameters():
            for suffix, sizes in rows.items():
                if name.endswith(suffix):
                    p.copy_(interleave(p, sizes, tp))
    seq, rep = Shard(1), Replicate()
    split, whole = (seq, None, None, None), (rep, None, None, None)  # attention's (x, positions, pos, cache)
    for block in blocks:
        mlp_in = "mlp.gate_up" if hasattr(block.mlp, "gate_up") else "mlp.up"
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=split, desired_input_layouts=whole),
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=seq),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,)),
            mlp_in: ColwiseParallel(),
            "mlp.down": RowwiseParallel(output_layouts=seq),
        }
        parallelize_module(block, mesh, plan)
        # the attention's reshapes read these: each rank now holds n_heads / tp query and n_kv_heads / tp kv heads
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp
    # the residual stream enters the blocks split over positions, and leaves them whole where the stage ends before
    # the final norm (a pipeline stage other than the last)
    enter = PrepareModuleInput(input_layouts=whole, desired_input_layouts=split, use_local_output=True)
    parallelize_module(blocks[0], mesh, enter)
    if model.norm is None:
        parallelize_module(blocks[-1], mesh, PrepareModuleOutput(output_layouts=seq, desired_output_layouts=rep))
    plan = {}
    if model.embed is not None:
        plan["embed"] = RowwiseParallel(input_layouts=rep, output_layouts=rep)  # whole T: positions add per position
        if hasattr(model.positions, "wpe"):
            plan["positions.wpe"] = RowwiseParallel(input_layouts=rep, output_layouts=rep)
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=rep)
    tied = model.embed is not None and model.lm_head is not None and model.lm_head.weight is model.embed.weight
    parallelize_module(model, mesh, plan)
    if tied:  # both hold the (vocab, dim) matrix split by vocabulary rows, so one DTensor serves both again
        model.lm_head.weight = model.embed.weight
    slopes = getattr(model.positions, "slopes", None)
    if slopes is not None:  # ALiBi: one slope per head, so each rank keeps its heads' slopes
        model.positions.slopes = slopes.chunk(tp)[mesh.get_local_rank()].clone()
