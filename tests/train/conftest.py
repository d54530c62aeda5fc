"""Fixtures for the training tests: a small folder of text files, and tiny pre-training runs on one process or on
several under torchrun (gloo on CPU), compared through their checkpoints and metrics."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_config
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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_text) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(tiny_text[i * 2500 : (i + 1) * 2500])
    return folder


class Runs:
    """Tiny runs of COMMON + overrides in one folder; `name` is the run's name."""

    def __init__(self, root: Path, corpus: Path):
        self.root, self.corpus = root, corpus

    def args(self, name: str, overrides) -> list[str]:
        return [*COMMON, *overrides, f"data.path={self.corpus}", f"run.root={self.root}", f"run.name={name}"]

    def single(self, name: str, *overrides: str, resume: bool = False) -> None:
        cfg = load_config(pretrain.PretrainConfig, None, self.args(name, overrides))
        cfg.resume = resume
        pretrain.main(cfg, Run.from_config(cfg.run))

    def torchrun(self, name: str, *overrides: str, nproc: int = 2, resume: bool = False, rc: int = 0) -> str:
        """Run `lmforge pretrain` on nproc ranks; assert its exit status and return its output."""
        args = ["-m", "lmforge", "pretrain", *self.args(name, overrides), *(["--resume"] if resume else [])]
        returncode, text = launch(args, nproc)
        assert returncode == rc, text
        return text

    def crashed_copy(self, name: str, copy: str, step: int = 4) -> str:
        """A copy of run `name` without its checkpoint of `step` (DCP shards and export), as after a crash."""
        shutil.copytree(self.root / name, self.root / copy)
        shutil.rmtree(self.root / copy / f"checkpoints/step_{step:06d}")
        shutil.rmtree(self.root / copy / f"dcp/step_{step:06d}")
        return copy

    def assert_same_weights(self, name: str, reference: str, rel: float | None = None, step: int = 4) -> None:
        """The exports of `step` equal bit for bit, or within `rel` as in assert_same_training."""
        a, b = self.weights(name, step), self.weights(reference, step)
        assert a.keys() == b.keys()
        for key in a:
            if rel is None:
                assert torch.equal(a[key], b[key]), key
            else:
                torch.testing.assert_close(a[key], b[key], atol=rel, rtol=10 * rel, msg=key)

    def weights(self, name: str, step: int = 4) -> dict[str, torch.Tensor]:
        return load_file(self.root / name / f"checkpoints/step_{step:06d}/model.safetensors")

    def metrics(self, name: str, key: str) -> list[float]:
        return [r[key] for r in Run(self.root / name).read_metrics() if key in r]

    def assert_same_training(self, name: str, reference: str, rel: float = 1e-5, steps=(2, 4)) -> None:
        """Loss, validation loss and gradient norm (before clipping) at every logged step within `rel` (fp32 sums in
        another order differ by ~1e-7), and weights at each checkpoint within atol 1e-5 (10 * rel), equal the
        reference run's."""
        assert self.metrics(name, "step") == self.metrics(reference, "step")  # rank 0 writes each row once
        assert self.metrics(name, "loss") == pytest.approx(self.metrics(reference, "loss"), rel=rel)
        # the same validation windows, however the layout splits them over the ranks
        assert self.metrics(name, "val_loss") == pytest.approx(self.metrics(reference, "val_loss"), rel=rel)
        expected = pytest.approx(self.metrics(reference, "grad_norm"), rel=rel, nan_ok=True)  # fp16 skips: inf, nan
        assert self.metrics(name, "grad_norm") == expected
        for step in steps:
            self.assert_same_weights(name, reference, rel, step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), corpus)


def launch(args: list[str], nproc: int, timeout: float = 600) -> tuple[int, str]:
    """`python ARGS` on nproc local ranks with the environment torchrun gives its workers (RANK, LOCAL_RANK,
    WORLD_SIZE, a free MASTER_PORT on loopback), without torchrun's launcher: it costs ~3 s of a 5 s trivial job,
    and these tests launch dozens of jobs (test_distributed.py and test_rank_failure.py run the real torchrun).
    Returns the exit status of the first rank to fail (0 if none did) and each rank's output; a rank that fails
    stops the others after a grace period (those waiting on it in a collective would wait forever)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    base |= {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    with contextlib.ExitStack() as files:
        logs = [files.enter_context(tempfile.TemporaryFile()) for _ in range(nproc)]
        procs = [
            subprocess.Popen(
                [sys.executable, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            )
            for rank, log in enumerate(logs)
        ]
        deadline, first_failure = time.monotonic() + timeout, 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode]
            if failed and not first_failure:
                first_failure, deadline = failed[0], min(deadline, time.monotonic() + 10)
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
            time.sleep(0.02)
        text = ""
        for rank, log in enumerate(logs):
            log.seek(0)
            text += f"[rank {rank}]\n" + log.read().decode(errors="replace")[-8000:]
    return first_failure or next((p.returncode for p in procs if p.returncode), 0), text


@pytest.fixture(scope="session")
def launcher():
    return launch
