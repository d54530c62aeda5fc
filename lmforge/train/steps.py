"""The steps every training loop shares: device choice, autocast, forward and backward over a step's micro-batches (a
pipeline's schedule included), the optimizer step with clipping and loss scaling, and a validation loss that is the
same on every layout."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.data.shards import eval_batches
from lmforge.errors import LmforgeError
from lmforge.train import parallel

Autocast = Callable[[], contextlib.AbstractContextManager]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str) -> Autocast:
    """A context factory: autocast to `dtype` (train.dtype: fp32, bf16, fp16) on `device`, or nothing for fp32."""
    amp = AUTOCAST[dtype]
    return lambda: torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    scaler: torch.amp.GradScaler,
    autocast: Autocast,
    sync_model: torch.nn.Module | None = None,
    pipe=None,
) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches (x, y on the device), accumulating the gradients of
    their mean loss; return that loss on this rank (a pipeline's earlier stages hold 0). `sync_model` is the DDP
    module whose all-reduce waits for the last micro-batch (`model` itself unless it is compiled); with `pipe` its
    schedule runs all the micro-batches' rows in one step."""
    if pipe is not None:
        x, y = (torch.cat([b[i] for b in micro_batches]) for i in (0, 1))
        with autocast():
            return pipe.step(x, y)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        with parallel.grad_sync(sync_model or model, sync=i == len(micro_batches) - 1):
            with autocast():
                loss = model(x, y) / len(micro_batches)
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def optimizer_step(model, optimizers, schedulers, scaler: torch.amp.GradScaler, clip: float, pc, mesh) -> torch.Tensor:
    """Unscale the gradients (fp16), clip their global norm, step every optimizer (the scaler skips the step when a
    gradient is inf or NaN) and schedule; return the norm before clipping."""
    for opt in optimizers:
        scaler.unscale_(opt)
    grad_norm = parallel.clip_grad_norm(model, clip if clip > 0 else 1e30, pc, mesh)
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    for sched in schedulers:
        sched.step()
    return grad_norm


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    val_dir: str | Path,
    seq_len: int,
    batch_size: int,
    num_batches: int,
    autocast: Autocast,
    share: tuple[int, int] = (0, 1),
    group: dist.ProcessGroup | None = None,
) -> float:
    """Mean next-token loss over the validation set: the first `num_batches` batches of `batch_size` windows, each
    token weighted once however the batches fall. Rank r of `share` = (r, n) evaluates batches r, r + n, ...; the
    sums of losses and of tokens are all-reduced over `group`, so every rank returns the loss of the whole set."""
    rank, ranks = share
    batches = list(eval_batches(val_dir, seq_len, batch_size, num_batches))
    mine = batches[rank::ranks]
    # every rank runs as many forwards (FSDP gathers parameters inside each): a short share repeats one, weighted 0
    rounds = -(-len(batches) // ranks)
    device = next(model.parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # sum of token losses, tokens
    was_training = model.training
    model.eval()
    for i in range(rounds):
        x, y = mine[i] if i < len(mine) else batches[0]
        with autocast():
            loss = model(x.to(device), y.to(device))
        if i < len(mine):
            totals += torch.tensor([loss.item() * y.numel(), y.numel()], dtype=torch.float64, device=device)
    model.train(was_training)
    if ranks > 1:
        dist.all_reduce(totals, group=group)
    return (totals[0] / totals[1]).item()
