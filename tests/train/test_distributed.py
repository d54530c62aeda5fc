"""Data parallelism on 2 CPU processes (gloo) trains the same weights as 1 process on the same global batch; bad
layouts are rejected before anything runs."""

import os
import socket
import subprocess
import sys
import time

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
    trained.assert_same_training("ddp", "single")  # the validation loss too: each rank evaluates half of one set
    assert all(norm > 0.3 for norm in trained.metrics("ddp", "grad_norm"))  # so clipping changed the update


def test_ddp_resume_continues_exactly(trained):
    trained.torchrun(trained.crashed_copy("ddp", "ddp_resumed"), "train.batch_size=4", resume=True)
    trained.assert_same_weights("ddp_resumed", "ddp")


def test_ddp_checkpoint_resumes_on_one_process_with_the_same_global_batch(trained):
    trained.single(trained.crashed_copy("ddp", "ddp_to_1"), "train.batch_size=8", resume=True)
    trained.assert_same_weights("ddp_to_1", "single", rel=1e-5)


def test_two_nodes_on_loopback_match_one_process(trained):
    """torchrun --nnodes 2 (one process each) meeting at a c10d rendezvous on 127.0.0.1, as two machines would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    node += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
    node += ["-m", "lmforge", "pretrain", *trained.args("two_nodes", ["train.batch_size=4"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
    time.sleep(1)  # the first agent hosts the rendezvous store on the port; the second joins it
    nodes.append(subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    for proc in nodes:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-5000:]
    trained.assert_same_training("two_nodes", "single")


def test_resume_with_another_global_batch_is_refused(trained):
    with pytest.raises(LmforgeError, match="trained on 8 sequences per micro-batch, this run on 4"):
        trained.single(trained.crashed_copy("ddp", "ddp_other_batch"), "train.batch_size=4", resume=True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.grid_g_co2_per_kwh=-1"], "train.grid_g_co2_per_kwh=-1.0 must be >= 0"),
        (["parallel.backend=nccl", "train.device=cpu"], "parallel.backend=nccl needs CUDA"),
        (["parallel.zero=4"], "choose one of 0, 1, 2, 3"),
        (["parallel.dp_shard=fsdp"], "unknown config key parallel.dp_shard"),
        (["parallel.tp=3", "model.n_heads=6", "model.n_kv_heads=2", "model.dim=48"], "n_kv_heads=2 \\(each rank"),
        (["parallel.tp=4", "model.n_heads=4", "model.n_kv_heads=2"], "must divide model.n_heads=4 and model.n_kv"),
        (["parallel.pp=3", "model.n_layers=2"], "parallel.pp=3 is more than model.n_layers=2"),
        (["parallel.pp=2", "model.tie_embeddings=true"], "set model.tie_embeddings=false"),
        (["parallel.pp=2", "train.batch_size=3", "train.grad_accum=1", "parallel.microbatches=2"], "must divide"),
        (["parallel.microbatches=4"], "but parallel.pp=1; set parallel.pp>1 or use train.grad_accum"),
        (["parallel.cpu_offload=true", "parallel.zero=1"], "parallel.zero=1 does not use FSDP; set parallel.zero=2"),
        (["train.dtype=fp16", "train.loss_scale=0"], "train.loss_scale=0.0 must be positive"),
        (["train.activation_checkpointing=true"], "choose one of none, full, selective"),
        (["train.activation_checkpointing=selective", "train.ac_every=0"], "train.ac_every=0 must be positive"),
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
        (2, dict(tp=2, zero=3, cpu_offload=True), r"but this layout has 1 data-parallel rank"),
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
