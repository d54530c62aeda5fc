"""TrainConfig: the knobs of a training loop (shared by pre-training and, later, fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import check


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """muon: Muon for the 2-D matrices inside blocks, AdamW for embeddings, head, norms and biases."""
    lr: float = 3e-3
    """AdamW peak learning rate."""
    muon_lr: float = 0.02
    """Muon peak learning rate (only with optimizer=muon)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine: warmup then cosine decay; wsd: warmup, stable, then linear decay over decay_fraction of steps."""
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16/fp16: autocast matmuls to bfloat16/float16, on CPU and GPU; weights and optimizer stay fp32 (master
    weights). fp16 adds dynamic loss scaling (torch.amp.GradScaler), skipping steps whose gradients overflow."""
    loss_scale: float = 2.0**16
    """fp16: the initial loss scale; halved at every overflow, doubled after 2,000 clean steps."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute blocks' activations in backward instead of storing them: full, every block; selective, every
    ac_every-th block (the others keep theirs). The bytes saved land in the run's summary (activation_bytes_*)."""
    ac_every: int = 2
    """With activation_checkpointing=selective: checkpoint blocks 0, k, 2k, ..."""
    eval_every: int = 50
    """Validation loss every this many steps (0: only at the end)."""
    eval_batches: int = 8
    """Validation batches of the global micro-batch (batch_size x data-parallel ranks windows): the validation set is
    the split's first eval_batches x batch_size x dp windows, so every layout of one global batch reports the same
    loss."""
    log_every: int = 10
    ckpt_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep."""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu, cuda or cuda:N."""
    grid_g_co2_per_kwh: float = 480.0
    """Carbon intensity of the electricity grid (g CO2 per kWh) for the report's CO2 figure; the default is the
    world average of 2023 (Ember, Global Electricity Review 2024). Set your own grid's."""
    cpu_watts_per_core: float = 10.0
    """Power of one busy CPU core, for the energy estimate where the RAPL counters cannot be read (often root-only)."""
    gpu_watts: float = 400.0
    """Power of one GPU, for the energy estimate where NVML cannot be read (pynvml missing)."""

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every", "keep_last", "ac_every"):
            check(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        for name in ("warmup_steps", "eval_every", "ckpt_every"):
            check(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0")
        check(self.lr > 0 and self.muon_lr > 0, "train.lr and train.muon_lr must be positive")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        check(0 < self.decay_fraction <= 1, f"train.decay_fraction={self.decay_fraction} must be in (0, 1]")
        check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")
        for name in ("grid_g_co2_per_kwh", "cpu_watts_per_core", "gpu_watts"):
            check(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0")
        check(self.loss_scale > 0, f"train.loss_scale={self.loss_scale} must be positive (fp16 starts from it)")
