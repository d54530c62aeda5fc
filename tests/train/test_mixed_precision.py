"""Mixed precision on 2 CPU processes (gloo). fp16 with dynamic loss scaling: under ZeRO, tensor and pipeline parallel
each rank sees only part of the gradients or of the optimizer, so an overflow one rank sees must skip the step on
every rank, and each layout trains what one process trains. bf16 autocast under ZeRO-3 trains what one process
trains too."""

import json
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("scaler_worker.py")
FP16 = ["train.dtype=fp16", "train.log_every=1"]


@pytest.fixture(scope="module")
def scaler_steps(tmp_path_factory, launcher) -> dict[str, list[dict]]:
    """Per scaler kind, per rank: did the weights move, and the scale after the step."""
    out = tmp_path_factory.mktemp("scaler")
    returncode, output = launcher([str(WORKER), str(out)], 2)
    assert returncode == 0, output[-6000:]
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]
    return {kind: [r[kind] for r in ranks] for kind in ranks[0]}


def test_an_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(scaler_steps):
    ranks = scaler_steps["all_ranks"]
    assert [r["moved"] for r in ranks] == [False, False]
    assert [r["scale"] for r in ranks] == [2.0**9, 2.0**9]  # both halved the scale


def test_a_per_rank_scaler_would_step_on_the_rank_that_saw_no_overflow(scaler_steps):
    # what the all-reduce prevents: rank 0 steps and keeps its scale, rank 1 skips: the stages drift apart
    ranks = scaler_steps["per_rank"]
    assert [r["moved"] for r in ranks] == [True, False]
    assert [r["scale"] for r in ranks] == [2.0**10, 2.0**9]


@pytest.fixture(scope="module")
def trained(runs):
    runs.single("fp16", *FP16, "train.batch_size=8")
    runs.torchrun("fp16_zero3", *FP16, "train.batch_size=4", "parallel.zero=3")
    runs.torchrun("fp16_tp2", *FP16, "train.batch_size=8", "parallel.tp=2")
    runs.torchrun("fp16_pp2", *FP16, "train.batch_size=8", "parallel.pp=2", "parallel.microbatches=2")
    runs.single("bf16", "train.dtype=bf16", "train.batch_size=8")
    runs.torchrun("bf16_zero3", "train.dtype=bf16", "train.batch_size=4", "parallel.zero=3")
    return runs


@pytest.mark.parametrize("name", ["fp16_zero3", "fp16_tp2", "fp16_pp2"])
def test_sharded_fp16_matches_one_process(trained, name):
    assert trained.metrics(name, "loss_scale") == trained.metrics("fp16", "loss_scale")
    # fp16 products summed in another order differ by ~1e-4 relative, where fp32 ones differ by ~1e-7
    trained.assert_same_training(name, "fp16", rel=1e-3)


def test_bf16_under_zero3_matches_one_process(trained):
    # bf16 keeps 8 bits of mantissa: products summed in another order differ by ~1e-3 relative
    trained.assert_same_training("bf16_zero3", "bf16", rel=1e-2)
