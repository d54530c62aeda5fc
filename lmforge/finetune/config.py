"""Supervised fine-tuning's settings (`lmforge finetune`): the base run, the data, the loop and the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.checkpoint import latest_checkpoint
from lmforge.config import check
from lmforge.errors import LmforgeError
from lmforge.finetune.distributed import check_layout
from lmforge.finetune.methods import PeftConfig
from lmforge.run import RunConfig, resolve_run
from lmforge.train.parallel import ParallelConfig


@dataclass
class SftDataConfig:
    path: str = ""
    """Instruction data: a JSON list or JSONL file (optionally .gz) of records in `format`."""
    format: Literal["alpaca", "messages", "prompt_completion", "hh_rlhf"] = "alpaca"
    """alpaca: {instruction, input, output}; messages: {messages: [{role, content}]} or ShareGPT's
    {conversations: [{from, value}]}; prompt_completion: {prompt, completion}; hh_rlhf: {chosen: "\\n\\nHuman: ..."}."""
    val_fraction: float = 0.1
    """Share of conversations held out for the validation loss and the greedy answers (by a hash of their text)."""
    packing: bool = True
    """Pack several examples per row (each attends only to itself); false: one example per row, padded."""
    seq_len: int = 0
    """Row length in tokens (0: the base model's max_seq_len); longer examples are rejected and counted."""

    def validate(self) -> None:
        check(bool(self.path), "data.path is empty; give the instruction data file (data.path=FILE)")
        check(Path(self.path).is_file(), f"data.path={self.path!r} is not a file; give a .json or .jsonl file")
        check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        check(self.seq_len >= 0, f"data.seq_len={self.seq_len} must be >= 0 (0: the model's context)")


@dataclass
class SftTrainConfig:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Rows per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """AdamW peak learning rate."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 5
    decay_fraction: float = 0.2
    """wsd: the share of steps that decay."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    """AdamW decay of matrices (vectors never decay)."""
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16: autocast matmuls; the weights and optimizer stay fp32."""
    activation_checkpointing: bool = False
    """Keep only each block's input for backward, which recomputes the rest: far less activation memory, about a
    third more compute."""
    eval_every: int = 0
    """Held-out loss every this many steps (0: before training and at the end only)."""
    log_every: int = 10
    ckpt_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu, cuda or cuda:N."""
    samples: int = 3
    """Held-out prompts answered greedily for the report."""
    max_new_tokens: int = 64

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_last", "max_new_tokens"):
            check(getattr(self, name) > 0, f"train.{name}={getattr(self, name)} must be positive")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "samples"):
            check(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0")
        check(self.lr > 0, f"train.lr={self.lr} must be positive")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        check(0 < self.decay_fraction <= 1, f"train.decay_fraction={self.decay_fraction} must be in (0, 1]")
        check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="sft"))
    base: str = ""
    """The run to fine-tune: its folder, or its name under run.root."""
    data: SftDataConfig = field(default_factory=SftDataConfig)
    train: SftTrainConfig = field(default_factory=SftTrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Under torchrun: data parallelism only (parallel.dp; train.batch_size is per rank)."""
    resume: bool = False
    """Continue from the newest checkpoint of run.name (the same as --resume)."""

    def validate(self) -> None:
        check_layout(self.parallel)
        check(bool(self.base), "base is empty; name the run to fine-tune (base=RUN)")
        base = resolve_run(self.base, self.run.root)
        if latest_checkpoint(base) is None:
            raise LmforgeError(f"base run {base} has no checkpoint; train it first (lmforge pretrain)")
        if base.resolve() == (Path(self.run.root) / self.run.name).resolve():
            raise LmforgeError(f"run.name={self.run.name} is the base run itself; give the fine-tuned run a new name")
