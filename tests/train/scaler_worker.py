"""Helper of test_mixed_precision.py: on 2 ranks (gloo), each rank holds its own part of a model in plain tensors,
as pipeline stages do, and rank 1 alone sees an inf gradient. `python scaler_worker.py OUT` steps once with lmforge's
scaler and once with torch's GradScaler and writes, per rank and scaler, whether its weights moved and the new scale."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.models import ModelConfig, build_model
from lmforge.train.config import TrainConfig
from lmforge.train.optim import build_optimizers
from lmforge.train.precision import AllRanksGradScaler

CFG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=16)


def step_once(kind: str, rank: int) -> dict:
    model = build_model(CFG, seed=rank)
    optimizer = build_optimizers(model, TrainConfig(optimizer="adamw", lr=1e-2))[0]
    scaler = (AllRanksGradScaler if kind == "all_ranks" else torch.amp.GradScaler)("cpu", init_scale=2.0**10)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(rank))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    scaler.scale(loss).backward()
    if rank == 1:
        model.lm_head.weight.grad[0, 0] = math.inf  # an overflow in rank 1's part only
    before = [p.clone() for p in model.parameters()]
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    moved = any(not p.equal(b) for p, b in zip(model.parameters(), before, strict=True))
    return {"moved": moved, "scale": scaler.get_scale()}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {kind: step_once(kind, rank) for kind in ("all_ranks", "per_rank")}
    (Path(sys.argv[1]) / f"rank_{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
