"""Loss scaling for fp16 training, on one process or many (Micikevicius et al., 2018)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.train.config import TrainConfig


class AllRanksGradScaler(torch.amp.GradScaler):
    """A GradScaler whose overflow flag is the maximum over all ranks, so every rank skips the same steps.

    An inf that one rank sees must stop the step everywhere. DTensor gradients (FSDP2, TP) already reduce the flag
    over the mesh dimensions they are sharded on, but pipeline stages hold their own layers in plain tensors, so the
    flag is all-reduced over the world here. torch's ShardedGradScaler does this for FSDP1, with a (1,)-shaped flag
    that the fused AdamW refuses; this keeps GradScaler's scalar flag.
    """

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if self.is_enabled():
            for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)


def loss_scaler(tc: TrainConfig, device: torch.device, world_size: int) -> torch.amp.GradScaler:
    """fp16: scale the loss so that small gradients survive fp16's range; a step with an inf/NaN gradient is skipped
    and the scale halved. Disabled (bf16, fp32), it passes everything through."""
    scaler = AllRanksGradScaler if world_size > 1 else torch.amp.GradScaler
    return scaler(device.type, init_scale=tc.loss_scale, enabled=tc.dtype == "fp16")
