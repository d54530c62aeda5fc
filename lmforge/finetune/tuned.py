"""The `Tuned` interface every fine-tuning method returns (methods.tune builds one): the loss the loop minimises,
the parameter groups it trains, the trainable weights it saves and loads, and a plain decoder to export."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch.nn as nn
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models import Decoder
from lmforge.models.packed import PackedRows

if TYPE_CHECKING:
    from lmforge.finetune.methods import PeftConfig


class Tuned(nn.Module):
    """A decoder with the method's trainable parts. Wrapped modules (LoRA, NF4, adapters) live inside `model`
    itself; methods that change the forward pass around the model (soft prompts, prefixes) override `loss`.

    Interface the fine-tuning loop uses: loss (and logits), param_groups, trainable_state / load_trainable_state,
    merged (when `merges`), num_trainable; `base_hash` is methods.same_base of the model before tuning."""

    merges = True
    """Whether `merged()` can fold the method into a plain Decoder (adapters and soft prompts cannot)."""

    def __init__(self, model: Decoder, cfg: PeftConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def loss(self, x: Tensor, y: Tensor, segments: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of targets y (B, T) (-100 ignored) given tokens x (B, T); `segments` (B, T) marks the
        examples packed in each row, which then do not attend to each other."""
        return self.model(x, y, cache=None if segments is None else PackedRows(segments))

    def logits(self, x: Tensor, segments: Tensor | None = None) -> Tensor:
        """(B, T, V) logits of tokens x (B, T) under the method (what evaluation and parity tests read)."""
        return self.model(x, cache=None if segments is None else PackedRows(segments))

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def trainable_state(self) -> dict[str, Tensor]:
        """The weights training changes, by name: what an adapter file or a resumable checkpoint must hold."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Copy `trainable_state()`'s tensors back in (the same method and config on the same base)."""
        own = dict(self.named_parameters())
        want = {n for n, p in own.items() if p.requires_grad}
        if set(state) != want:
            extra, missing = sorted(set(state) - want), sorted(want - set(state))
            raise LmforgeError(
                f"the saved trainable weights do not fit peft.method={self.cfg.method} (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); load them with the peft config they were trained with"
            )
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise LmforgeError(
                    f"saved {name} has shape {tuple(t.shape)} but the model's is {tuple(own[name].shape)}; "
                    "load it onto the base model and peft config it was trained with"
                )
            own[name].data.copy_(t)

    def merged(self) -> Decoder:
        """A plain decoder computing what this one computes: a copy with every wrapped linear folded into an
        nn.Linear (LoRA's B A added, NF4 dequantised), or the model itself when nothing is wrapped."""
        if not self.merges:
            raise LmforgeError(
                f"peft.method={self.cfg.method} adds computation a plain decoder lacks; save trainable_state() and "
                "load it with load_trainable_state() onto tune(base, cfg) instead"
            )
        if not any(hasattr(m, "plain") for m in self.model.modules()):
            return self.model
        model = copy.deepcopy(self.model)
        done: list[str] = []
        for name, module in list(model.named_modules()):
            if hasattr(module, "plain") and not any(name.startswith(d + ".") for d in done):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, module.plain())
                done.append(name)
        return model.requires_grad_(False)

    def num_trainable(self) -> tuple[int, int]:
        """(trainable parameters, all parameters)."""
        seen: dict[int, tuple[int, bool]] = {id(p): (p.numel(), p.requires_grad) for p in self.parameters()}
        return sum(n for n, g in seen.values() if g), sum(n for n, _ in seen.values())
