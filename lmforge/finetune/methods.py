"""Which weights fine-tuning trains, picked by `peft.method`: every weight, the last layers only, or a
parameter-efficient method that adds its own (one file each beside this one: lora.py with nf4.py for QLoRA,
adapters.py, soft_prompts.py).

`tune(model, cfg)` returns a `Tuned` model (tuned.py): the loop calls it for the loss, trains `param_groups(lr)`,
saves `trainable_state()` (and loads it back with `load_trainable_state`); `merged()` gives back a plain Decoder for
export and serving where the method folds into one (`Tuned.merges`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge.config import check
from lmforge.finetune import adapters, lora, soft_prompts
from lmforge.finetune.tuned import Tuned
from lmforge.models import Decoder

__all__ = ["METHODS", "PeftConfig", "Tuned", "same_base", "tune"]


@dataclass
class PeftConfig:
    method: Literal["full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "ptuning"] = "full"
    """full: every weight; freeze: the last `freeze_last` layers; lora (+ dora, rslora, loraplus_ratio); qlora: LoRA
    on NF4 weights; adapter: bottleneck adapters; prefix: trained keys and values per layer; prompt: a soft prompt;
    ptuning: a soft prompt made by an encoder (MLP or LSTM)."""
    freeze_last: int = 1
    """freeze: how many of the last layers train."""
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "proj"])
    """lora/qlora: module names to wrap: attention's q, k, v (slices of the fused qkv) and proj, the MLP's gate, up
    (slices of SwiGLU's gate_up) and down, or lm_head."""
    rank: int = 8
    """lora/qlora: rank r of the update B A."""
    alpha: float = 16.0
    """lora/qlora: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """lora/qlora: dropout on the update's input."""
    dora: bool = False
    """lora/qlora: DoRA, a trained magnitude per output row over the updated weight's direction."""
    rslora: bool = False
    """lora/qlora: rank-stabilised scaling alpha / sqrt(r)."""
    loraplus_ratio: float = 1.0
    """lora/qlora: LoRA+, the B matrices train at lr * loraplus_ratio (1: plain LoRA)."""
    double_quant: bool = True
    """qlora: quantise the NF4 block scales to 8 bits too."""
    adapter_dim: int = 16
    """adapter: bottleneck width."""
    virtual_tokens: int = 8
    """prefix/prompt/ptuning: number of virtual tokens."""
    prefix_hidden: int = 0
    """prefix: width of the reparametrisation MLP (0: train the keys and values directly)."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """ptuning: the prompt encoder."""
    encoder_hidden: int = 0
    """ptuning: the encoder's hidden width (0: the model's dim)."""

    def validate(self) -> None:
        check(self.freeze_last >= 1, f"peft.freeze_last={self.freeze_last} must be >= 1")
        check(self.rank >= 1, f"peft.rank={self.rank} must be >= 1")
        check(self.alpha > 0, f"peft.alpha={self.alpha} must be > 0")
        check(0 <= self.dropout < 1, f"peft.dropout={self.dropout} must be in [0, 1)")
        check(self.loraplus_ratio > 0, f"peft.loraplus_ratio={self.loraplus_ratio} must be > 0")
        check(self.adapter_dim >= 1, f"peft.adapter_dim={self.adapter_dim} must be >= 1")
        check(self.virtual_tokens >= 1, f"peft.virtual_tokens={self.virtual_tokens} must be >= 1")
        check(self.prefix_hidden >= 0, f"peft.prefix_hidden={self.prefix_hidden} must be >= 0")
        check(self.encoder_hidden >= 0, f"peft.encoder_hidden={self.encoder_hidden} must be >= 0")
        if self.method in ("lora", "qlora"):
            check(len(self.targets) > 0, "peft.targets is empty; name at least one module (e.g. [q, v])")


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


METHODS = {
    "full": _full,
    "freeze": _freeze,
    "lora": lora.tune_lora,
    "qlora": lora.tune_qlora,
    "adapter": adapters.tune_adapters,
    "prefix": soft_prompts.tune_prefix,
    "prompt": soft_prompts.tune_prompt,
    "ptuning": soft_prompts.tune_ptuning,
}


def tune(model: Decoder, cfg: PeftConfig) -> Tuned:
    """Prepare `model` for training by `cfg.method` (in place: the method wraps or freezes its modules)."""
    cfg.validate()
    base = same_base(model)
    tuned = METHODS[cfg.method](model, cfg)
    tuned.base_hash = base  # of the weights before any wrapping: what an adapter file records (peft_format.py)
    return tuned


@torch.no_grad()
def same_base(model: Decoder) -> str:
    """A short hash of a base model's weights, written beside adapters so one is never loaded onto another base."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().flatten()[:1024].float().cpu().numpy().tobytes())  # a sample: never a whole copy
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]
