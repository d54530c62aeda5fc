"""Pipeline parallelism: the decoder's layers split into consecutive stages, one per rank of the pp mesh dimension,
run by torch.distributed.pipelining's GPipe (Huang et al., 2019) or 1F1B (Narayanan et al., 2021) schedule."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lmforge.models import Decoder

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class Stage(nn.Module):
    """Layers [lo, hi) of a Decoder; the first stage also embeds, the last also norms and projects to logits.

    Parameter names equal the Decoder's (layers keep their global index), so a stage's state dict is a slice of the
    model's."""

    def __init__(self, model: Decoder, lo: int, hi: int):
        super().__init__()
        first, last = lo == 0, hi == len(model.layers)
        self.cfg = model.cfg  # the whole model's, for checkpoints
        self.embed = model.embed if first else None
        self.positions, self.drop = model.positions, model.drop
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in range(lo, hi)})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        if not first:  # learned position embeddings are added by the first stage only
            self.positions.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T) token ids on the first stage, else (B, T, C) activations. Returns (B, T, C) or (B, T, V) logits."""
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)
        if self.embed is not None:
            x = self.drop(self.positions.embed(self.embed(x), pos))  # (B, T, C)
        for block in self.layers.values():
            x = block(x, self.positions, pos, None)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))  # (B, T, V)
        return x

    def own_state_dict(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """`sd` without the frozen copies of position embeddings on stages after the first."""
        return {k: v for k, v in sd.items() if self.embed is not None or not k.startswith("positions.")}


def stage_layers(n_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """Layers [lo, hi) of `stage`: an even split, the first n_layers % pp stages one layer longer."""
    size, extra = divmod(n_layers, pp)
    lo = stage * size + min(stage, extra)
    return lo, lo + size + (stage < extra)


def build_stage(model: Decoder, mesh: DeviceMesh) -> Stage:
    pp, stage = mesh.size(), mesh.get_local_rank()
    return Stage(model, *stage_layers(len(model.layers), pp, stage))


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    B, T, V = logits.shape
    return F.cross_entropy(logits.view(B * T, V).float(), targets.reshape(B * T), ignore_index=-100)


class Pipeline:
    """One training step of a stage: forward and backward of every micro-batch in the schedule's order."""

    def __init__(
        self,
        module: nn.Module,
        mesh: DeviceMesh,
        device: torch.device,
        schedule: str,
        microbatches: int,
        scaler: torch.amp.GradScaler,
    ):
        stage, pp = mesh.get_local_rank(), mesh.size()
        self.first, self.last = stage == 0, stage == pp - 1
        self.stage = PipelineStage(module, stage, pp, device, group=mesh.get_group())
        # the loss is a mean per micro-batch and the schedule divides gradients by `microbatches` (scale_grads), so
        # a step equals one process accumulating micro-batch losses / grad_accum
        self.scaler = scaler  # fp16: the schedule runs backward itself, so the loss it backpropagates is scaled
        # GradScaler creates its scale where a loss is first scaled (the last stage); every stage unscales, so here
        scaler.scale(torch.zeros((), device=device))
        self.schedule = SCHEDULES[schedule](self.stage, microbatches, loss_fn=self._scaled_loss)

    def _scaled_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.scaler.scale(next_token_loss(logits, targets))

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """x, y: (B, T), the whole step's batch. The mean micro-batch loss on the last stage, 0 elsewhere."""
        losses: list[Tensor] = []
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses, return_outputs=False)
        else:
            self.schedule.step()
        if not losses:
            return torch.zeros((), device=x.device)
        return torch.stack(losses).mean().detach() / (self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
