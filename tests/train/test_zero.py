"""ZeRO stages 1-3 on 2 CPU processes (gloo) train the same weights as 1 process on the same global batch, while each
rank holds half of what ZeRO's stage shards: optimizer state (1), gradients too (2), parameters too (3)."""

import json
import shutil

import pytest
import torch


@pytest.fixture(scope="module")
def trained(runs):
    # 2 ranks x batch 4 deal out the same 8 windows per micro-batch as 1 rank x batch 8
    runs.single("adamw", "train.batch_size=8")
    # ZeRO-1 with Muon also runs (it shards by whole parameters), but Muon orthogonalises in bfloat16, which turns the
    # reduction order's 1e-7 differences into 1e-4: AdamW keeps the comparison at 1e-5
    runs.torchrun("zero1", "train.batch_size=4", "parallel.zero=1")
    runs.torchrun("zero2", "train.batch_size=4", "parallel.zero=2")
    runs.torchrun("zero3", "train.batch_size=4", "parallel.zero=3")
    return runs


def rank0_bytes(runs, name: str) -> dict[str, int]:
    training = json.loads((runs.root / name / "pretrain.json").read_text())["training"]
    return {k: training[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}


@pytest.mark.parametrize(("name", "reference"), [("zero1", "adamw"), ("zero2", "adamw"), ("zero3", "adamw")])
def test_zero_matches_one_process(trained, name, reference):
    trained.assert_same_training(name, reference)


@pytest.mark.parametrize(
    ("name", "reference", "sharded"),
    [
        ("zero1", "adamw", {"optimizer_bytes"}),
        # measured after backward: FSDP2 has resharded the parameters by then under ZeRO-2 as well; what ZeRO-2 keeps
        # whole is the gathered parameters between forward and backward
        ("zero2", "adamw", {"optimizer_bytes", "grad_bytes", "param_bytes"}),
        ("zero3", "adamw", {"optimizer_bytes", "grad_bytes", "param_bytes"}),
    ],
)
def test_each_stage_halves_what_it_shards(trained, name, reference, sharded):
    ours, full = rank0_bytes(trained, name), rank0_bytes(trained, reference)
    for key in full:
        if key in sharded:  # ZeRO-1 splits by whole parameters, so its halves are only roughly even
            assert ours[key] <= (0.6 if name == "zero1" else 0.52) * full[key], key
        else:
            assert ours[key] == full[key], key


def test_zero1_resume_continues_exactly(trained, tmp_path):
    shutil.copytree(trained.root / "zero1", tmp_path / "zero1")
    shutil.rmtree(tmp_path / "zero1/checkpoints/step_000004")
    trained.root, root = tmp_path, trained.root
    try:
        trained.torchrun("zero1", "train.batch_size=4", "parallel.zero=1", resume=True)
        resumed = trained.weights("zero1")
    finally:
        trained.root = root
    for key, value in trained.weights("zero1").items():
        assert torch.equal(resumed[key], value), key
