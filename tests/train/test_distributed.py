"""Data parallelism on 2 CPU processes (gloo) trains the same weights as 1 process on the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.run import Run
from lmforge.train import pretrain

TINY = [
    "model.vocab_size=384",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.hidden_dim=64",
    "model.max_seq_len=32",
    "train.eval_batches=2",
    "train.log_every=2",
    "train.warmup_steps=2",
]
# 4 steps of 2 micro-batches: the first micro-batch runs under DDP's no_sync; clipping at 0.3 is active
COMMON = [
    *TINY,
    "train.steps=4",
    "train.grad_accum=2",
    "train.grad_clip=0.3",
    "train.eval_every=0",
    "train.ckpt_every=2",
    "train.keep_last=5",
    "sample.prompts=[]",
]


def run_pretrain(root: Path, corpus: Path, *overrides: str, name: str, resume: bool = False) -> None:
    cfg = load_config(
        pretrain.PretrainConfig, None, [*overrides, f"data.path={corpus}", f"run.root={root}", f"run.name={name}"]
    )
    cfg.resume = resume
    pretrain.main(cfg, Run.from_config(cfg.run))


def torchrun(root: Path, corpus: Path, name: str, *overrides: str, resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [*COMMON, f"data.path={corpus}", f"run.root={root}", f"run.name={name}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [*cmd, "-m", "lmforge", "pretrain", *args, *(["--resume"] if resume else [])],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(root / name / "checkpoints/step_000004/model.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("runs")
    # 2 ranks x batch 4 deal out the same 8 windows per micro-batch as 1 rank x batch 8
    run_pretrain(root, corpus, *COMMON, "train.batch_size=8", name="single")
    torchrun(root, corpus, "ddp", "train.batch_size=4", "parallel.dp_shard=ddp")
    torchrun(root, corpus, "fsdp", "train.batch_size=4", "parallel.dp_shard=fsdp")
    return root


@pytest.mark.parametrize("dp_shard", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(runs, dp_shard):
    assert_close(weights(runs, dp_shard), weights(runs, "single"))
    rows = Run(runs / dp_shard).read_metrics()
    losses = [r["loss"] for r in rows if "loss" in r]
    expected = [r["loss"] for r in Run(runs / "single").read_metrics() if "loss" in r]
    assert losses == pytest.approx(expected, abs=1e-5)  # the logged loss is the mean over ranks
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]  # written once, by rank 0
    assert all(r["grad_norm"] > 0.3 for r in rows if "loss" in r)  # so clipping changed the update


def test_ddp_resume_continues_exactly(runs, corpus, tmp_path):
    shutil.copytree(runs / "ddp", tmp_path / "ddp")
    shutil.rmtree(tmp_path / "ddp/checkpoints/step_000004")
    torchrun(tmp_path, corpus, "ddp", "train.batch_size=4", resume=True)
    assert_close(weights(tmp_path, "ddp"), weights(runs, "single"))


def test_ddp_checkpoint_resumes_only_at_its_world_size(runs, corpus):
    with pytest.raises(LmforgeError, match="written by 2 processes"):
        run_pretrain(runs, corpus, *COMMON, "train.batch_size=4", name="ddp", resume=True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["parallel.dp_shard=fsdp", "train.optimizer=muon"], "use train.optimizer=adamw"),
        (["parallel.backend=nccl", "train.device=cpu"], "parallel.backend=nccl needs CUDA"),
        (["parallel.dp_shard=zero2"], "choose one of ddp, fsdp"),
    ],
)
def test_invalid_parallel_config_is_rejected(overrides, match):
    with pytest.raises(LmforgeError, match=match):
        load_config(pretrain.PretrainConfig, None, overrides)
