"""The main job: from nothing to a trained, sampled, measured model on a laptop CPU in minutes.

Run: `lmforge speedrun [depth=4] [run.name=speedrun]` (what `make run` does). One dial, `depth`, sets the model
size; width, heads, learning rates, batch and steps are derived from it here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config import check
from lmforge.data.corpus import DataConfig
from lmforge.models import ModelConfig
from lmforge.run import Run, RunConfig
from lmforge.tokenizer import TokenizerConfig
from lmforge.train import pretrain
from lmforge.train.config import TrainConfig


@dataclass
class SpeedrunConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="speedrun"))
    depth: int = 4
    """Transformer layers; the width is 64 per layer, heads are 64 wide, the rest follows."""
    steps: int = 0
    """Optimizer steps (0: derived from depth so the whole job takes about 10 minutes on 2 CPU cores)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(max_bytes=24_000_000))
    """Default: the embedded corpus (this interpreter's standard library), capped for speed."""
    device: str = "auto"

    def validate(self) -> None:
        check(1 <= self.depth <= 48, f"depth={self.depth} must be in 1..48")
        check(self.steps >= 0, f"steps={self.steps} must be >= 0")


def pretrain_config(cfg: SpeedrunConfig) -> pretrain.PretrainConfig:
    """Every size-dependent choice, derived from depth."""
    dim = 64 * cfg.depth
    hidden = 64 * round(8 * dim / 3 / 64)  # SwiGLU at the parameter count of a 4x GELU MLP
    batch, seq = 16, 256
    # depth 4 runs ~5,000 tok/s in bf16 on 2 cores, so 600 steps of 4,096 tokens (about one pass over the embedded
    # corpus) take ~8 minutes (docs/log.md). Deeper models get fewer steps but, at ~depth^3 cost per step, more time.
    steps = cfg.steps or max(50, int(600 * (4 / cfg.depth) ** 2))
    model = ModelConfig(
        preset="",
        vocab_size=4096,
        dim=dim,
        n_layers=cfg.depth,
        n_heads=max(1, dim // 64),
        n_kv_heads=max(1, dim // 64),
        hidden_dim=hidden,
        max_seq_len=seq,
    )
    train = TrainConfig(
        steps=steps,
        batch_size=batch,
        optimizer="muon",
        # tuned at depth 4 over 150 steps (docs/log.md): AdamW (embeddings, head) 3e-3 -> 4e-2 took val loss
        # 4.88 -> 4.38; Muon 0.006 beat 0.02, 0.01 and 0.003
        lr=4e-2 * (256 / dim) ** 0.5,
        muon_lr=0.006,
        beta2=0.99,
        schedule="wsd",
        warmup_steps=min(50, steps // 10),
        decay_fraction=0.3,
        min_lr_ratio=0.0,
        weight_decay=0.0,
        dtype="bf16",
        eval_every=max(50, steps // 8),
        eval_batches=16,
        log_every=25,
        ckpt_every=max(100, steps // 4),
        device=cfg.device,
    )
    return pretrain.PretrainConfig(run=cfg.run, data=cfg.data, tokenizer=TokenizerConfig(), model=model, train=train)


def main(cfg: SpeedrunConfig, run: Run) -> dict[str, float]:
    return pretrain.main(pretrain_config(cfg), run)
