"""A run folder runs no code when it is resumed or loaded: planted pickles in a DCP checkpoint's .metadata, in its
shards' non-tensor values and in trainer.pt are refused with one line (exit 2), and what torch writes still loads."""

import os
import pathlib
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.models import ModelConfig, build_model
from lmforge.train.dcp import latest_dcp, load_dcp, save_dcp
from lmforge.train.safe_dcp import read_metadata

CFG = ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


class Touch:
    """Unpickling this creates `path`: the proof that a pickle ran."""

    def __init__(self, path: Path, how: str):
        self.path, self.how = path, how

    def __reduce__(self):
        if self.how == "shell":
            return os.system, (f"touch {self.path}",)
        if self.how == "method":  # an allowed module (pathlib), a name that is not allowed
            return pathlib.Path.touch, (pathlib.Path(self.path),)
        return exec, (f"open({str(self.path)!r}, 'w').close()",)


def trained(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = build_model(CFG, seed=0).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    model(ids).float().logsumexp(-1).mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model, optimizer, scheduler = trained()
    return save_dcp(tmp_path_factory.mktemp("dcp"), 1, model, [optimizer], [scheduler], state={"loader": 3})


def fresh():
    model = build_model(CFG, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5.0)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "step_000001"))


def test_what_torch_writes_loads_exactly(ckpt):
    want, want_opt, want_sched = trained()
    model, optimizer, scheduler = fresh()
    state = load_dcp(ckpt, model, [optimizer], [scheduler])
    assert state["loader"] == 3
    for (name, a), b in zip(want.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert optimizer.param_groups[0]["lr"] == want_opt.param_groups[0]["lr"]  # a non-tensor value, unpickled safely
    assert optimizer.param_groups[0]["betas"] == want_opt.param_groups[0]["betas"]
    assert scheduler.state_dict() == want_sched.state_dict()
    for p, q in zip(want.parameters(), model.parameters(), strict=True):
        assert torch.equal(want_opt.state[p]["exp_avg"], optimizer.state[q]["exp_avg"])


def test_bf16_metadata_reads(tmp_path):
    model, optimizer, scheduler = trained(torch.bfloat16)
    saved = save_dcp(tmp_path, 1, model, [optimizer], [scheduler])
    entry = read_metadata(saved / ".metadata").state_dict_metadata["model.embed.weight"]
    assert entry.properties.dtype == torch.bfloat16 and tuple(entry.size) == (CFG.vocab_size, CFG.dim)


@pytest.mark.parametrize("how", ["shell", "method", "exec"])
def test_a_planted_metadata_pickle_runs_nothing(ckpt, tmp_path, how):
    marker = tmp_path / "pwned"
    bad = copy(ckpt, tmp_path)
    (bad / ".metadata").write_bytes(pickle.dumps(Touch(marker, how)))
    model, optimizer, scheduler = fresh()
    with pytest.raises(LmforgeError, match=r"\.metadata is not DCP metadata that lmforge wrote .*refusing"):
        load_dcp(bad, model, [optimizer], [scheduler])
    assert not marker.exists()


def test_metadata_that_patches_a_class_runs_nothing(ckpt, tmp_path):
    """BUILD on an admitted class (not an instance) would replace its methods for the rest of the process."""
    bad = copy(ckpt, tmp_path)
    meta = pickle.dumps(read_metadata(ckpt / ".metadata"), protocol=4)
    # STACK_GLOBAL the Metadata class, BUILD (None, {"__eq__": None}) on it, POP; then the real index (its PROTO cut)
    module, name, key = (
        len(t).to_bytes(1, "little") + t for t in (b"torch.distributed.checkpoint.metadata", b"Metadata", b"__eq__")
    )
    patch = b"\x80\x04\x8c" + module + b"\x8c" + name + b"\x93N}\x8c" + key + b"Ns\x86b0"
    (bad / ".metadata").write_bytes(patch + meta[2:])
    with pytest.raises(LmforgeError, match="sets attributes of"):
        read_metadata(bad / ".metadata")
    from torch.distributed.checkpoint.metadata import Metadata

    assert Metadata.__eq__ is not None


def test_a_planted_pickle_among_the_shards_runs_nothing(ckpt, tmp_path):
    """A non-tensor value (an optimizer's lr) pointed at pickle bytes appended to a shard file."""
    marker = tmp_path / "pwned"
    bad = copy(ckpt, tmp_path)
    meta = read_metadata(bad / ".metadata")
    index, info = next((i, s) for i, s in meta.storage_data.items() if i.fqn.endswith(".lr"))
    shard = bad / info.relative_path
    offset = shard.stat().st_size
    payload = pickle.dumps(Touch(marker, "shell"))
    shard.write_bytes(shard.read_bytes() + payload)
    meta.storage_data[index] = replace(info, offset=offset, length=len(payload))
    (bad / ".metadata").write_bytes(pickle.dumps(meta))
    model, optimizer, scheduler = fresh()
    with pytest.raises(LmforgeError, match=r"param_groups\..*\.lr is not plain data"):
        load_dcp(bad, model, [optimizer], [scheduler])
    assert not marker.exists()


def test_a_shard_path_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    bad = copy(ckpt, tmp_path)
    meta = read_metadata(bad / ".metadata")
    index, info = next(iter(meta.storage_data.items()))
    meta.storage_data[index] = replace(info, relative_path="../../etc/passwd")
    (bad / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(LmforgeError, match="is not a file name inside the checkpoint folder"):
        read_metadata(bad / ".metadata")


def test_a_planted_trainer_pickle_runs_nothing(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    bad = copy(ckpt, tmp_path)
    (bad / "trainer.pt").write_bytes(pickle.dumps(Touch(marker, "shell")))
    model, optimizer, scheduler = fresh()
    with pytest.raises(LmforgeError, match="trainer.pt is missing or corrupt"):
        load_dcp(bad, model, [optimizer], [scheduler])
    assert not marker.exists()
    torch.save({"schedulers": "nope"}, bad / "trainer.pt")
    with pytest.raises(LmforgeError, match="trainer.pt is not what lmforge writes"):
        load_dcp(bad, model, [optimizer], [scheduler])


def test_pretrain_resume_from_a_planted_pickle_exits_2_with_one_line(tmp_path, corpus, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    args = [
        "pretrain",
        *(f"model.{k}={getattr(CFG, k)}" for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads")),
        f"model.hidden_dim={CFG.hidden_dim}",
        f"model.max_seq_len={CFG.max_seq_len}",
        "train.batch_size=4",
        "train.eval_every=0",
        "train.warmup_steps=1",
        "sample.max_new_tokens=0",
        f"data.path={corpus}",
        f"run.root={tmp_path}",
        "run.name=r",
    ]
    main([*args, "train.steps=2"])
    (latest_dcp(tmp_path / "r") / ".metadata").write_bytes(pickle.dumps(Touch(marker, "shell")))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--resume", *args[1:], "train.steps=4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "refusing to load it" in lines[0], lines
    assert not marker.exists()
