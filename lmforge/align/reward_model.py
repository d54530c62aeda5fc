"""A scalar-headed decoder: the reward model (Ouyang et al., 2022: the policy's backbone, its LM head replaced by one
linear output) and PPO's value model. Saved as a plain checkpoint of the backbone plus `score_head.safetensors`."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from torch import Tensor

from lmforge.checkpoint import latest_checkpoint, load_run, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.models import Decoder

HEAD_FILE = "score_head.safetensors"


class ScoreModel(nn.Module):
    """backbone's final hidden states -> one number per position; `scores` reads the last real token of each row."""

    def __init__(self, backbone: Decoder):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.dim, 1, bias=False, device=backbone.lm_head.weight.device)
        nn.init.normal_(self.head.weight, std=1 / (backbone.cfg.dim + 1) ** 0.5)

    def values(self, x: Tensor) -> Tensor:
        """(B, T) a score after every position of x (B, T) (PPO's values)."""
        hidden = self.backbone.hidden_states(x)
        values = self.head(self.backbone.norm(hidden)).squeeze(-1)
        return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values

    def scores(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B,) the score after the last of each row's `lengths` real tokens (rows right-padded)."""
        values = self.values(x)
        return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)

    def head_tensors(self) -> dict[str, dict[str, Tensor]]:
        """save_checkpoint's extra_tensors: the head beside the backbone, written in the same atomic rename."""
        return {HEAD_FILE: {"weight": self.head.weight}}

    def save(self, run_dir: str | Path, step: int, info: dict, keep_last: int = 2, backbone: Decoder | None = None):
        """A checkpoint of `backbone` (default: self.backbone; a PEFT-wrapped one gives its merged copy) and head."""
        return save_checkpoint(run_dir, step, backbone or self.backbone, info, keep_last, self.head_tensors())


def load_score_model(run: str | Path, device="cpu") -> tuple[ScoreModel, object]:
    """A reward-model run's newest checkpoint with its head, and its tokenizer."""
    backbone, tokenizer = load_run(run, device)
    ckpt = latest_checkpoint(run)
    path = ckpt / HEAD_FILE
    if not path.is_file():
        raise LmforgeError(f"{ckpt} has no {HEAD_FILE}; give a run trained with `lmforge align method=rm`")
    model = ScoreModel(backbone)
    weight = safetensors.torch.load_file(str(path), device=str(device))["weight"]
    if weight.shape != model.head.weight.shape:
        raise LmforgeError(f"{path} holds a head of shape {tuple(weight.shape)}, not {tuple(model.head.weight.shape)}")
    with torch.no_grad():
        model.head.weight.copy_(weight)
    return model.eval(), tokenizer
