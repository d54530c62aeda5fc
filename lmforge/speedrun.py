"""The main job: from nothing to a filtered corpus and a trained, sampled, measured model on a laptop CPU in minutes.

Run: `lmforge speedrun [depth=4] [run.name=speedrun]` (what `make run` does). The corpus goes through the data stages
(lmforge/data/prepare.py) into the run folder's data/, then pre-training trains on its shards. One dial, `depth`, sets
the model size; width, heads, learning rates, batch and steps are derived from it here and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from lmforge.config import check, to_dict
from lmforge.data import prepare
from lmforge.data.config import DataPrepConfig
from lmforge.data.corpus import DataConfig
from lmforge.eval import heldout
from lmforge.models import ModelConfig
from lmforge.run import Run, RunConfig
from lmforge.tokenizer import TokenizerConfig
from lmforge.train import pretrain
from lmforge.train.config import TrainConfig


@dataclass
class SpeedrunDataConfig(DataPrepConfig):
    """`lmforge data prepare`'s settings, with the prepared data written into the run folder by default."""

    output: str = ""
    """Folder for the prepared data; "" is the run folder's data/, where pre-training reads its shards."""
    val_fraction: float = 0.02
    """Share of the kept documents held out for validation (by a hash of the document id)."""

    def validate(self) -> None:
        DataPrepConfig.validate(replace(self, output=self.output or "data"))


@dataclass
class SpeedrunConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="speedrun"))
    depth: int = 4
    """Transformer layers; the width is 64 per layer, heads are 64 wide, the rest follows."""
    steps: int = 0
    """Optimizer steps (0: derived from depth so the whole job takes about 10 minutes on 2 CPU cores)."""
    data: SpeedrunDataConfig = field(default_factory=SpeedrunDataConfig)
    """The data stages; data.input="" is the embedded corpus (this interpreter's standard library, 9.6 MB), and
    data.vocab_size is the model's vocabulary too."""
    device: str = "auto"

    def validate(self) -> None:
        check(1 <= self.depth <= 48, f"depth={self.depth} must be in 1..48")
        check(self.steps >= 0, f"steps={self.steps} must be >= 0")


def pretrain_config(cfg: SpeedrunConfig, data_path: str = "") -> pretrain.PretrainConfig:
    """Every size-dependent choice, derived from depth, for training on the prepared data at `data_path`."""
    dim = 64 * cfg.depth
    hidden = 64 * round(8 * dim / 3 / 64)  # SwiGLU at the parameter count of a 4x GELU MLP
    batch, seq = 16, 256
    # depth 4 runs ~5,000 tok/s in bf16 on 2 cores, so 600 steps of 4,096 tokens (about one pass over the embedded
    # corpus) take ~8 minutes (docs/log.md). Deeper models get fewer steps but, at ~depth^3 cost per step, more time.
    steps = cfg.steps or max(50, int(600 * (4 / cfg.depth) ** 2))
    model = ModelConfig(
        preset="",
        vocab_size=cfg.data.vocab_size,
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
    data = DataConfig(path=data_path)
    return pretrain.PretrainConfig(run=cfg.run, data=data, tokenizer=TokenizerConfig(), model=model, train=train)


def main(cfg: SpeedrunConfig, run: Run) -> dict[str, float]:
    data = replace(cfg.data, output=cfg.data.output or str(run.file("data")))
    run.write_json("data_config.json", {"run": to_dict(cfg.run), **to_dict(data)})  # its report section comes first
    t0 = time.perf_counter()
    prepare.main(data)
    prepare_seconds = time.perf_counter() - t0
    print(f"data stages: {prepare_seconds:.0f}s, prepared data in {data.output}", flush=True)
    # pretrain records the data lineage and each stage's counts in the run's data.json
    metrics = {"data_stages_seconds": prepare_seconds, **pretrain.main(pretrain_config(cfg, data.output), run)}
    return {**metrics, **heldout.main(run)}  # bits per byte and a next-line choice on the held-out split
