"""Helper of test_steps.py: on 2 ranks (gloo), a model whose blocks FSDP shards evaluates 3 validation batches, rank
0 two and rank 1 one (FSDP gathers parameters in every forward, so rank 1 runs a third, weighted 0).
`python eval_worker.py VAL_DIR OUT` writes each rank's validation loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lmforge.models import build_model
from lmforge.train.steps import autocast_for, evaluate

sys.path.insert(0, str(Path(__file__).parent))
from test_steps import CFG, SEQ  # noqa: E402

if __name__ == "__main__":
    val_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build_model(CFG, seed=0)
    mesh = init_device_mesh("cpu", (2,))
    for block in model.layers.children():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = evaluate(model, val_dir, SEQ, 3, 3, autocast_for(torch.device("cpu"), "fp32"), (rank, 2))
    (out / f"rank_{rank}.json").write_text(json.dumps(loss))
    dist.destroy_process_group()
