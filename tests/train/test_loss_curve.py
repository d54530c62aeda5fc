"""A stored loss curve of a tiny run, reproduced after any refactor (regenerate only on purpose:
`.venv/bin/python tests/train/test_loss_curve.py`, and say why in the commit)."""

import json
import sys
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.run import Run
from lmforge.train import pretrain

STORED = Path(__file__).with_name("tiny_loss_curve.json")
SHAKESPEARE = Path(__file__).resolve().parents[1] / "fixtures/tinyshakespeare_120k.txt"  # its first 120,000 bytes
OVERRIDES = [
    "model.preset=llama-tiny",
    "model.vocab_size=320",
    "model.dim=48",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.hidden_dim=96",
    "model.max_seq_len=32",
    "train.steps=12",
    "train.batch_size=4",
    "train.grad_accum=2",
    "train.optimizer=muon",
    "train.lr=0.01",
    "train.warmup_steps=3",
    "train.log_every=1",
    "train.eval_every=6",
    "train.eval_batches=2",
    "sample.prompts=[]",
]


def train_curve(root: Path) -> list[list[float]]:
    corpus = root / "corpus"
    corpus.mkdir()
    text = SHAKESPEARE.read_text()[:120_000]
    for i in range(12):
        (corpus / f"part{i:02d}.txt").write_text(text[i * 10_000 : (i + 1) * 10_000])
    cfg = load_config(pretrain.PretrainConfig, None, [*OVERRIDES, f"data.path={corpus}", f"run.root={root}"])
    run = Run.from_config(cfg.run)
    pretrain.main(cfg, run)
    return [[r["step"], r.get("loss", r.get("val_loss"))] for r in run.read_metrics("pretrain")]


def test_tiny_loss_curve_is_reproduced(tmp_path):
    # rtol 1e-4, not bit equality: another CPU's kernels round differently (the curve was stored on an AMD EPYC; an
    # Intel Xeon's AVX-512 kernels land within 2.3e-5 of it); a refactor that changes the maths moves these numbers
    # by far more
    curve, stored = train_curve(tmp_path), json.loads(STORED.read_text())
    assert [step for step, _ in curve] == [step for step, _ in stored]
    assert [loss for _, loss in curve] == pytest.approx([loss for _, loss in stored], rel=1e-4)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        curve = train_curve(Path(tmp))
    STORED.write_text(json.dumps(curve) + "\n")
    print(f"wrote {STORED} ({len(curve)} points)", file=sys.stderr)
