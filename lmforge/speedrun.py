"""The main job: from nothing to a filtered corpus and a trained, sampled, measured model on a laptop CPU in minutes.

Run: `lmforge speedrun [depth=4] [run.name=speedrun]` (what `make run` does). The corpus goes through the data stages
(lmforge/data/prepare.py) into the run folder's data/, then pre-training trains on its shards, then fine-tuning teaches
the model to write a function from its description (pairs mined from the corpus) into the run `<run.name>-sft`, and DPO
prefers each description's own function over another's (`<run.name>-dpo`); last, the pre-trained model is quantized
(`<run.name>-int8`, `-int4`, `-gptq`) and each is measured on the held-out text. One
dial, `depth`, sets the model size; width, heads, learning rates, batch and steps are derived from it here and nowhere
else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmforge.align import preference
from lmforge.align.config import AlignConfig, AlignDataConfig, DpoConfig
from lmforge.compress import stage as compress_stage
from lmforge.config import check, to_dict
from lmforge.data import prepare
from lmforge.data.config import DataPrepConfig
from lmforge.data.corpus import DataConfig
from lmforge.eval import heldout
from lmforge.finetune import sft
from lmforge.finetune.code_pairs import mine_pairs
from lmforge.finetune.config import FinetuneConfig, SftDataConfig, SftTrainConfig
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
    finetune_steps: int = 0
    """Fine-tuning steps after pre-training (0: a fifth of the pre-training steps, at least 2: about three passes over
    the mined pairs)."""
    align_steps: int = 0
    """DPO steps after fine-tuning (0: a tenth of the pre-training steps, at least 2)."""
    compress_methods: list[str] = field(default_factory=lambda: ["int8", "int4", "gptq"])
    """The pre-trained model quantized by each of these at the end (see lmforge/compress/stage.py)."""
    device: str = "auto"

    def validate(self) -> None:
        check(
            set(self.compress_methods) <= set(compress_stage.METHODS),
            f"compress_methods={list(self.compress_methods)} may hold only {', '.join(compress_stage.METHODS)}",
        )
        check(1 <= self.depth <= 48, f"depth={self.depth} must be in 1..48")
        check(self.steps >= 0, f"steps={self.steps} must be >= 0")
        check(self.finetune_steps >= 0, f"finetune_steps={self.finetune_steps} must be >= 0")
        check(self.align_steps >= 0, f"align_steps={self.align_steps} must be >= 0")


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
    pre = pretrain_config(cfg, data.output)
    metrics = {"data_stages_seconds": prepare_seconds, **pretrain.main(pre, run)}
    t0 = time.perf_counter()
    tuned = finetune_config(cfg, run, pre.train.steps)
    ft = sft.main(tuned, Run.from_config(tuned.run))
    _copy_summary(run, tuned.run, "finetune")
    ft_seconds = time.perf_counter() - t0
    print(f"fine-tuning: {ft_seconds:.0f}s, the fine-tuned run is {tuned.run.root}/{tuned.run.name}", flush=True)
    t0 = time.perf_counter()
    aligned = align_config(cfg, run, tuned, pre.train.steps)
    dpo = preference.train(aligned, Run.from_config(aligned.run))
    _copy_summary(run, aligned.run, "align")
    align_seconds = time.perf_counter() - t0
    print(f"DPO: {align_seconds:.0f}s, the aligned run is {aligned.run.root}/{aligned.run.name}", flush=True)
    stages = {"finetune_seconds": ft_seconds, "finetune_val_loss": ft["val_loss_after"]}
    stages |= {"align_seconds": align_seconds, "align_val_accuracy": dpo["val_accuracy_after"]}
    # the pre-trained model's held-out bits per byte and a next-line choice, in this run's eval section
    evaluated = heldout.main(run)
    # then the pre-trained model quantized, and each quantized run's held-out perplexity
    return {**metrics, **stages, **evaluated, **compress_stage.main(run, cfg.run, cfg.compress_methods)}


def _copy_summary(run: Run, stage_run: RunConfig, stage: str) -> None:
    """A later stage's config and summary in this run's report too (its weights live in their own run folder)."""
    for name in (f"{stage}_config.json", f"{stage}.json"):
        run.write_text(name, (Path(stage_run.root) / stage_run.name / name).read_text())


def finetune_config(cfg: SpeedrunConfig, run: Run, pretrain_steps: int) -> FinetuneConfig:
    """Fine-tuning of the pre-trained run on function-writing pairs mined from the corpus, written into the run
    folder: the stage's steps follow from the pre-training's, about 2,000 tokens each (~1 minute at depth 4)."""
    pairs = run.file("finetune_pairs.jsonl")
    run.write_text("finetune_pairs.jsonl", "".join(json.dumps(p) + "\n" for p in mine_pairs(600)))
    train = SftTrainConfig(
        steps=cfg.finetune_steps or max(2, pretrain_steps // 5),
        batch_size=8,
        lr=1e-3,
        warmup_steps=5,
        dtype="bf16",
        eval_every=0,
        log_every=10,
        samples=3,
        max_new_tokens=48,
        device=cfg.device,
    )
    run_cfg = replace(cfg.run, name=f"{cfg.run.name}-sft")
    data = SftDataConfig(path=str(pairs), format="prompt_completion", val_fraction=0.05)
    return FinetuneConfig(run=run_cfg, base=str(run.path), data=data, train=train)


def align_config(cfg: SpeedrunConfig, run: Run, tuned: FinetuneConfig, pretrain_steps: int) -> AlignConfig:
    """DPO of the fine-tuned run on pairs from the same mined functions: each description's own function chosen over
    the function of another pair, so the implicit reward's held-out accuracy says whether the model ties what it
    writes to what it was asked."""
    mined = mine_pairs(600)
    pairs = [
        {"prompt": p["prompt"], "chosen": p["completion"], "rejected": mined[(i + 7) % len(mined)]["completion"]}
        for i, p in enumerate(mined)
    ]
    path = run.write_text("align_pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs))
    train = SftTrainConfig(
        steps=cfg.align_steps or max(2, pretrain_steps // 10),
        batch_size=8,
        lr=1e-4,
        warmup_steps=0,
        dtype="bf16",
        eval_every=0,
        log_every=10,
        device=cfg.device,
    )
    return AlignConfig(
        run=replace(cfg.run, name=f"{cfg.run.name}-dpo"),
        method="dpo",
        policy=str(Path(tuned.run.root) / tuned.run.name),
        data=AlignDataConfig(path=str(path), format="pairs", val_fraction=0.05),
        train=train,
        dpo=DpoConfig(loss="sigmoid", beta=0.1),
    )
