"""Pipeline parallelism on 2 CPU processes (gloo), GPipe and 1F1B, and composed with FSDP and tensor parallelism on
8, trains the same weights as 1 process on the same batch; 3 layers over 2 stages split unevenly."""

import pytest

from lmforge.train.pipeline import stage_layers

# 3 layers: stage 0 takes 2 (and the embedding), stage 1 takes 1 (and the norm and lm_head); validation every 2 steps
PIPE = ["model.n_layers=3", "train.batch_size=8", "train.eval_every=2"]


@pytest.fixture(scope="module")
def trained(runs):
    # pipeline stages read the same batch: both runs see 2 micro-batches of 8 windows per step
    runs.single("single", *PIPE)
    runs.torchrun("gpipe", *PIPE, "parallel.pp=2", "parallel.schedule=gpipe")
    # 4 micro-batches of 4 windows: the mean of their means is the 2 x 8 windows' mean
    runs.torchrun("1f1b", *PIPE, "parallel.pp=2", "parallel.schedule=1f1b", "parallel.microbatches=4")
    # 3-D: 2 stages x 2 FSDP ranks x 2 tensor-parallel ranks on 8 processes; 2 dp ranks x batch 4 = 8 windows
    pp_dp_tp = ["parallel.pp=2", "parallel.dp=2", "parallel.tp=2", "parallel.zero=3"]
    runs.torchrun("3d", *PIPE, "train.batch_size=4", *pp_dp_tp, nproc=8)
    return runs


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_pipeline_matches_one_process(trained, name):
    trained.assert_same_training(name, "single")
    # validation runs on rank 0 with the gathered stages
    assert trained.metrics(name, "val_loss") == pytest.approx(trained.metrics("single", "val_loss"), rel=1e-5)
    assert len(trained.metrics(name, "val_loss")) == 2


def test_pipeline_checkpoint_resumes_on_one_process(trained):
    # each stage wrote its own layers' shards; one process reads the whole model and its optimizer state
    trained.single(trained.crashed_copy("gpipe", "gpipe_to_1"), *PIPE, resume=True)
    trained.assert_same_weights("gpipe_to_1", "single", rel=1e-5)


def test_pipeline_of_fsdp_and_tensor_parallel_matches_one_process(trained):
    # three reorderings of the sums at once (tensor, pipeline and FSDP): on an Intel Xeon's kernels the weights drift
    # past 1e-5 after two steps, on an AMD EPYC they did not
    trained.assert_same_training("3d", "single", rel=1e-4)


def test_stages_split_layers_evenly_earliest_first():
    assert [stage_layers(3, 2, s) for s in range(2)] == [(0, 2), (2, 3)]
    assert [stage_layers(8, 4, s) for s in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [stage_layers(2, 2, s) for s in range(2)] == [(0, 1), (1, 2)]
