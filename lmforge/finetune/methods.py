"""Which weights fine-tuning trains: every weight, the last layers only, or a parameter-efficient method that adds
its own (LoRA, adapters, soft prompts: one file each beside this one).

`tune(model, cfg)` returns a `Tuned` model: the loop calls it for the loss, trains `param_groups(lr)`, and saves
`trainable_state()`; `merged()` gives back a plain Decoder for export and serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.config import check
from lmforge.models import Decoder
from lmforge.models.packed import PackedRows


@dataclass
class PeftConfig:
    method: Literal["full", "freeze"] = "full"
    """full: train every weight; freeze: train only the last `freeze_last` layers (and the final norm)."""
    freeze_last: int = 1
    """freeze: how many of the last layers train."""
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "proj"])
    """Module names a method wraps (LoRA and kin): attention's q, k, v (slices of the fused qkv) and proj, the
    MLP's gate, up (slices of gate_up) and down, or lm_head."""

    def validate(self) -> None:
        check(self.freeze_last >= 1, f"peft.freeze_last={self.freeze_last} must be >= 1")


class Tuned(nn.Module):
    """A decoder with the method's trainable parts. Subclasses change `loss` only where the method changes the
    forward pass (soft prompts); wrapped modules (LoRA, adapters) live inside `model` itself."""

    def __init__(self, model: Decoder, cfg: PeftConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def loss(self, x: Tensor, y: Tensor, segments: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of targets y (B, T) (-100 ignored) given tokens x (B, T); `segments` (B, T) marks the
        examples packed in each row, which then do not attend to each other."""
        return self.model(x, y, cache=None if segments is None else PackedRows(segments))

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def trainable_state(self) -> dict[str, Tensor]:
        """The weights training changes, by name: what an adapter file or a resumable checkpoint must hold."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def merged(self) -> Decoder:
        """A plain decoder computing what this one computes (a copy where the method must fold weights in)."""
        return self.model

    def num_trainable(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        seen: dict[int, tuple[int, bool]] = {id(p): (p.numel(), p.requires_grad) for p in self.parameters()}
        return sum(n for n, g in seen.values() if g), sum(n for n, _ in seen.values())


def _full(model: Decoder, cfg: PeftConfig) -> Tuned:
    model.requires_grad_(True)
    return Tuned(model, cfg)


def _freeze(model: Decoder, cfg: PeftConfig) -> Tuned:
    n = model.cfg.n_layers
    check(cfg.freeze_last <= n, f"peft.freeze_last={cfg.freeze_last} exceeds the model's {n} layers")
    model.requires_grad_(False)
    for block in model.layers[n - cfg.freeze_last :]:
        block.requires_grad_(True)
    model.norm.requires_grad_(True)
    return Tuned(model, cfg)


METHODS = {"full": _full, "freeze": _freeze}


def tune(model: Decoder, cfg: PeftConfig) -> Tuned:
    """Prepare `model` for training by `cfg.method` (in place: the method wraps or freezes its modules)."""
    return METHODS[cfg.method](model, cfg)


@torch.no_grad()
def same_base(model: Decoder) -> str:
    """A short hash of a base model's weights, written beside adapters so one is never loaded onto another base."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().cpu().numpy().tobytes()[:4096])
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]
