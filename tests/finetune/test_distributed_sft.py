"""`lmforge finetune` under torchrun on 2 CPU processes (gloo) trains the weights 1 process trains on the same global
batch, for full fine-tuning and LoRA; layouts other than data parallelism are refused."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.finetune.config import FinetuneConfig
from lmforge.run import Run

REPO = Path(__file__).parent.parent.parent
ALPACA = REPO / "tests/fixtures/alpaca_20.json"
# 3 steps of 2 micro-batches (the first under no_sync), clipping on
COMMON = ["train.steps=3", "train.grad_accum=2", "train.grad_clip=0.1", "train.lr=1e-3", "train.warmup_steps=1",
          "train.log_every=1", "train.samples=0", "train.device=cpu", "data.seq_len=96"]  # fmt: skip


def finetune(root: Path, base: Path, name: str, method: str, batch: int, nproc: int) -> None:
    args = [*COMMON, f"base={base}", f"data.path={ALPACA}", f"run.root={root}", f"run.name={name}"]
    args += [f"peft.method={method}", f"train.batch_size={batch}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command = launcher if nproc > 1 else [sys.executable]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([*command, "-m", "lmforge", "finetune", *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_ranks_match_one_rank_with_the_doubled_batch(tmp_path, tiny_run, method):
    finetune(tmp_path, tiny_run, "one", method, batch=4, nproc=1)
    finetune(tmp_path, tiny_run, "two", method, batch=2, nproc=2)
    one, two = Run(tmp_path / "one"), Run(tmp_path / "two")
    for key in ("loss", "val_loss", "grad_norm"):
        a, b = ([r[key] for r in run.read_metrics() if key in r] for run in (two, one))
        assert len(a) == len(b) > 1 and a == pytest.approx(b, rel=1e-5), key  # rank 0 logged each row once
    assert max(r["grad_norm"] for r in one.read_metrics() if "grad_norm" in r) > 0.1  # so clipping acted
    a, b = (torch.load(r.path / "checkpoints/step_000003/finetune_state.pt", weights_only=True) for r in (two, one))
    assert a["trainable"].keys() == b["trainable"].keys() and a["loader"] == b["loader"]
    for name in a["trainable"]:
        torch.testing.assert_close(a["trainable"][name], b["trainable"][name], rtol=1e-4, atol=1e-5, msg=name)
    assert two.read_json("finetune.json")["training"]["data_parallel_ranks"] == 2


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2", "parallel.zero=3"])
def test_other_layouts_are_refused_naming_what_works(tiny_run, layout):
    with pytest.raises(LmforgeError, match="runs data parallel only .* set parallel.tp=1 parallel.pp=1"):
        load_config(FinetuneConfig, None, [f"base={tiny_run}", f"data.path={ALPACA}", layout])
