"""Optimizers: AdamW with decay only on matrices, or Muon (Jordan et al., 2024) for the matrices inside blocks
with AdamW for the rest. AdamW is torch.optim's; Muon is torch.optim's too, taught to orthogonalise sharded matrices."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from lmforge.train.config import TrainConfig


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """The optimizers for `model`; the loop steps every one of them."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    hidden_matrices = {n for n, p in params.items() if p.ndim == 2 and n.startswith("layers.")}
    muon_names = hidden_matrices if cfg.optimizer == "muon" else set()
    decay = [p for n, p in params.items() if p.ndim >= 2 and n not in muon_names]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.device.type in ("cpu", "cuda") for p in params.values())
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)
    ]
    if muon_names:
        matrices = [params[n] for n in sorted(muon_names)]
        # match_rms_adamw scales each update to AdamW's RMS, so muon_lr behaves like a (larger) AdamW rate
        optimizers.append(Muon(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"))
    return optimizers


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose matrices may be DTensors sharded over ranks (FSDP's ZeRO-2/3, tensor parallelism): the
    momentum stays sharded (it is elementwise), each matrix's update is gathered whole for its Newton-Schulz
    orthogonalisation, which every rank computes, and each rank keeps its own shard of the result, as distributed
    Muon implementations do (Liu et al., 2025, "Muon is Scalable for LLM Training"). On plain tensors it runs
    torch's steps, in torch's order. The state is torch's (momentum_buffer), so checkpoints load either way."""

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = update.full_tensor() if isinstance(update, DTensor) else update  # an all-gather
                ortho = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if isinstance(p, DTensor):  # this rank's shard of the whole update, cut locally (no communication)
                    ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)
                p.mul_(1 - lr * decay)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
