"""Helper of test_zero.py: on 2 ranks (gloo), lmforge's Muon steps a model whose blocks FSDP shards (ZeRO-3) and
torch.optim.Muon steps a whole copy, both from the same gradients. `python muon_worker.py OUT` writes, per matrix,
the largest difference between the gathered sharded weights and the whole copy's after 3 steps."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from lmforge.models import ModelConfig, build_model
from lmforge.train.config import TrainConfig
from lmforge.train.optim import Muon, build_optimizers

# 3 x 40 rows of kv: FSDP splits some matrices unevenly over the 2 ranks
CFG = ModelConfig(vocab_size=64, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=72, max_seq_len=16)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    sharded, whole = build_model(CFG, seed=0), build_model(CFG, seed=0)
    for block in sharded.layers.children():
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    muon = build_optimizers(sharded, TrainConfig(optimizer="muon", muon_lr=0.05, weight_decay=0.1))[1]
    assert isinstance(muon, Muon)
    names = {id(p): n for n, p in sharded.named_parameters()}
    matrices = [names[id(p)] for p in muon.param_groups[0]["params"]]
    params = dict(whole.named_parameters())
    reference = torch.optim.Muon([params[n] for n in matrices], **muon.defaults)
    assert type(reference) is torch.optim.Muon
    sharded_params = dict(sharded.named_parameters())
    for step in range(3):
        for name in matrices:
            seed = step * 1000 + zlib.crc32(name.encode())  # the same on both ranks
            grad = torch.randn(params[name].shape, generator=torch.Generator().manual_seed(seed))
            params[name].grad = grad
            p = sharded_params[name]
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
        muon.step()
        reference.step()
    diffs = {n: float((sharded_params[n].full_tensor() - params[n]).abs().max()) for n in matrices}
    moved = {n: float((params[n] - dict(build_model(CFG, seed=0).named_parameters())[n]).abs().max()) for n in matrices}
    if dist.get_rank() == 0:
        (out / "muon.json").write_text(json.dumps({"diff": diffs, "moved": moved}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
