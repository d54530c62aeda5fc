"""Distributed checkpoints: saved by 2 FSDP ranks and loaded by 1 process (and the reverse) with weights and optimizer
state bit-identical, training continuing as if never stopped; DDP too; export to safetensors; bad checkpoints."""

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig
from lmforge.train.dcp import export_safetensors, latest_dcp, load_dcp, save_dcp

WORKER = Path(__file__).with_name("dcp_worker.py")
_spec = importlib.util.spec_from_file_location("dcp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def assert_same(a, b, exact: bool = True, where: str = "") -> None:
    """Nested state dicts equal: tensors bit for bit (or to fp32 rounding after further training), the rest by ==."""
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], exact, f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, exact, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def out(tmp_path_factory, launcher) -> Path:
    """2 FSDP ranks save step 2; one process trains to step 2 and saves; 2 FSDP ranks load that."""
    out = tmp_path_factory.mktemp("dcp")

    def torchrun(mode: str) -> None:  # dcp_worker.py on 2 ranks
        returncode, output = launcher([str(WORKER), mode, str(out)], 2)
        assert returncode == 0, output[-6000:]

    torchrun("save")
    module, optimizers, schedulers = worker.build()
    worker.train(module, optimizers, schedulers, 0, 2)
    save_dcp(out / "single", 2, module, optimizers, schedulers)
    torch.save(worker.full_state(module, optimizers), out / "single_step2.pt")
    worker.train(module, optimizers, schedulers, 2, 4)
    torch.save(worker.full_state(module, optimizers), out / "single_step4.pt")
    torchrun("load")
    return out


def saved(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=True)


def test_two_fsdp_ranks_to_one_process_exactly_and_training_continues(out):
    module, optimizers, schedulers = worker.build()
    state = load_dcp(out / "fsdp/dcp/step_000002", module, optimizers, schedulers)
    assert state == {"step": 2, "world_size": 2, "note": "fsdp"}
    assert_same(worker.full_state(module, optimizers), saved(out, "fsdp_step2"))
    assert schedulers[0].last_epoch == 2
    worker.train(module, optimizers, schedulers, 2, 4)
    assert_same(worker.full_state(module, optimizers), saved(out, "fsdp_step4"), exact=False)


def test_one_process_to_two_fsdp_ranks_exactly_and_training_continues(out):
    assert_same(saved(out, "fsdp_from_single_step2"), saved(out, "single_step2"))
    assert_same(saved(out, "fsdp_from_single_step4"), saved(out, "single_step4"), exact=False)


def test_resume_at_the_same_world_size_is_bit_identical(out):
    assert_same(saved(out, "fsdp_loaded_step2"), saved(out, "fsdp_step2"))
    assert_same(saved(out, "fsdp_resumed_step4"), saved(out, "fsdp_step4"))


def test_ddp_loads_fsdp_shards_and_its_own_checkpoint_loads_in_one_process(out):
    assert_same(saved(out, "ddp_loaded_step2"), saved(out, "fsdp_step2"))
    assert_same(saved(out, "ddp_resumed_step4"), saved(out, "fsdp_step4"), exact=False)
    module, optimizers, schedulers = worker.build()
    load_dcp(out / "ddp/dcp/step_000004", module, optimizers, schedulers)
    assert_same(worker.full_state(module, optimizers), saved(out, "ddp_resumed_step4"))


def test_export_to_safetensors_loads_with_load_model(out, tmp_path):
    exported = export_safetensors(out / "fsdp/dcp/step_000002", tmp_path / "export")
    assert sorted(p.name for p in exported.iterdir()) == ["model.json", "model.safetensors"]
    model = load_model(exported)
    assert_same(model.state_dict(), saved(out, "fsdp_step2")["model"])


def test_a_checkpoint_of_another_model_shape_is_one_clear_error(out):
    other = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)
    module, optimizers, schedulers = worker.build(cfg=other)
    with pytest.raises(LmforgeError, match=r"holds another model shape \(dim=32, n_layers=2.*is \[256, 32\] there"):
        load_dcp(out / "fsdp/dcp/step_000002", module, optimizers, schedulers)


def test_an_interrupted_save_leaves_the_last_complete_checkpoint(out, tmp_path):
    module, optimizers, schedulers = worker.build()
    worker.train(module, optimizers, schedulers, 0, 2)
    save_dcp(tmp_path, 2, module, optimizers, schedulers)
    worker.train(module, optimizers, schedulers, 2, 3)
    with pytest.raises(TypeError):  # fails after the shards are written, before the rename
        save_dcp(tmp_path, 3, module, optimizers, schedulers, state={"not json": object()})
    assert any((tmp_path / "dcp/.step_000003.tmp").glob("*.distcp"))
    assert latest_dcp(tmp_path) == tmp_path / "dcp/step_000002"
    module, optimizers, schedulers = worker.build()
    load_dcp(latest_dcp(tmp_path), module, optimizers, schedulers)
    assert_same(worker.full_state(module, optimizers), saved(out, "single_step2"))


def test_a_truncated_checkpoint_is_one_clear_error(out, tmp_path):
    ckpt = shutil.copytree(out / "single/dcp/step_000002", tmp_path / "step_000002")
    metadata = ckpt / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    module, optimizers, schedulers = worker.build()
    with pytest.raises(LmforgeError, match="is not a complete DCP checkpoint"):
        load_dcp(ckpt, module, optimizers, schedulers)


def test_rng_and_schedule_come_back(out):
    module, optimizers, schedulers = worker.build()
    trainer = torch.load(out / "single/dcp/step_000002/trainer.pt", weights_only=True)
    torch.manual_seed(12345)
    load_dcp(out / "single/dcp/step_000002", module, optimizers, schedulers)
    assert torch.equal(torch.get_rng_state(), trainer["torch_rng"])
    assert optimizers[0].param_groups[0]["lr"] == saved(out, "single_step2")["optim"]["param_groups"][0]["lr"]
