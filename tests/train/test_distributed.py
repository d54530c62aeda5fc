"""Data parallelism on 2 CPU processes (gloo) trains the same weights as 1 process on the same global batch; bad
layouts are rejected before anything runs."""

import os
import shutil
import subprocess
import sys

import pytest

from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.train import pretrain
from lmforge.train.parallel import ParallelConfig


@pytest.fixture(scope="module")
def trained(runs):
    # 2 ranks x batch 4 deal out the same 8 windows per micro-batch as 1 rank x batch 8
    runs.single("single", "train.batch_size=8")
    runs.torchrun("ddp", "train.batch_size=4")
    return runs


def test_two_ranks_match_one_rank_with_the_same_global_batch(trained):
    trained.assert_same_training("ddp", "single")
    assert all(norm > 0.3 for norm in trained.metrics("ddp", "grad_norm"))  # so clipping changed the update


def test_ddp_resume_continues_exactly(trained, tmp_path):
    shutil.copytree(trained.root / "ddp", tmp_path / "ddp")
    shutil.rmtree(tmp_path / "ddp/checkpoints/step_000004")
    trained.root, root = tmp_path, trained.root
    try:
        trained.torchrun("ddp", "train.batch_size=4", resume=True)
        resumed = trained.weights("ddp")
    finally:
        trained.root = root
    for key, value in trained.weights("single").items():
        assert resumed[key].allclose(value, atol=1e-5, rtol=1e-4), key


def test_ddp_checkpoint_resumes_only_at_its_world_size(trained):
    with pytest.raises(LmforgeError, match="written by 2 processes"):
        trained.single("ddp", "train.batch_size=4", resume=True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["parallel.zero=3", "train.optimizer=muon"], "use train.optimizer=adamw"),
        (["parallel.zero=2", "train.optimizer=muon"], "use train.optimizer=adamw"),
        (["parallel.backend=nccl", "train.device=cpu"], "parallel.backend=nccl needs CUDA"),
        (["parallel.zero=4"], "choose one of 0, 1, 2, 3"),
        (["parallel.dp_shard=fsdp"], "unknown config key parallel.dp_shard"),
        (["parallel.tp=3", "model.n_heads=6", "model.n_kv_heads=2", "model.dim=48"], "n_kv_heads=2 \\(each rank"),
        (["parallel.tp=4", "model.n_heads=4", "model.n_kv_heads=2"], "must divide model.n_heads=4 and model.n_kv"),
        (["parallel.pp=3", "model.n_layers=2"], "parallel.pp=3 is more than model.n_layers=2"),
        (["parallel.pp=2", "model.tie_embeddings=true"], "set model.tie_embeddings=false"),
        (["parallel.pp=2", "train.batch_size=3", "train.grad_accum=1", "parallel.microbatches=2"], "must divide"),
        (["parallel.microbatches=4"], "but parallel.pp=1; set parallel.pp>1 or use train.grad_accum"),
    ],
)
def test_invalid_parallel_config_is_rejected(overrides, match):
    with pytest.raises(LmforgeError, match=match):
        load_config(pretrain.PretrainConfig, None, overrides)


@pytest.mark.parametrize(
    ("world", "values", "match"),
    [
        (2, dict(dp=3), r"parallel.dp=3 x parallel.tp=1 x parallel.pp=1 = 3 is not the 2 processes"),
        (4, dict(tp=3), r"parallel.tp=3 x parallel.pp=1 = 3 does not divide the 4 processes"),
        (1, dict(tp=2), r"does not divide the 1 processes.*torchrun --nproc-per-node"),
        (4, dict(tp=2), r"parallel.dp=2 with parallel.tp=2 .* needs parallel.zero=2 or 3"),
        (4, dict(pp=2, zero=1), r"needs parallel.zero=2 or 3"),
    ],
)
def test_a_mesh_that_does_not_fit_the_world_is_rejected(world, values, match):
    with pytest.raises(LmforgeError, match=match):
        ParallelConfig(**values).mesh_shape(world)


def test_mesh_shape_derives_dp():
    assert ParallelConfig(tp=2, pp=2, zero=3).mesh_shape(8) == (2, 2, 2)
    assert ParallelConfig(tp=2).mesh_shape(2) == (1, 1, 2)


def test_a_bad_mesh_exits_2_with_one_line_before_any_process_group(corpus, tmp_path):
    # the environment torchrun gives rank 0 of 2: the layout is checked before a process group would wait for rank 1
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    args = ["parallel.tp=4", "model.n_heads=4", "model.n_kv_heads=4", f"run.root={tmp_path}", f"data.path={corpus}"]
    out = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", *args], capture_output=True, text=True, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "parallel.tp=4 x parallel.pp=1 = 4 does not divide the 2 processes" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not list(tmp_path.rglob("pretrain_config.json"))
