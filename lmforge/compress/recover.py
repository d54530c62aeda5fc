"""The plain training loop the compression methods that train share (ternary's QAT, distillation, low-rank and
weight-sharing recovery): a loss on random batches of calibration windows, AdamW from cfg.train, the warmup and
decay schedule, gradient clipping, metrics rows, and the held-out loss on a few windows before and after."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.finetune.config import SftTrainConfig
from lmforge.finetune.sft import optimizer_step
from lmforge.run import Run
from lmforge.train.schedule import lr_multiplier
from lmforge.train.steps import pick_device

# a batch of windows (B, T) -> the scalar loss to minimise
Loss = Callable[[Tensor], Tensor]


def require_windows(windows: Tensor | None, steps: int, option: str) -> None:
    """Refuse to train without calibration text (before anything is written)."""
    if steps > 0 and windows is None:
        raise LmforgeError(
            f"{option}={steps} trains on calibration text; give calibration.path=FILE (or set {option}=0)"
        )


def split(windows: Tensor, held_out: int = 8, gram: int = 32) -> tuple[Tensor, Tensor]:
    """(train windows, held-out windows): the last min(held_out, N // 8) windows are held out (a single window is
    both), and a training window sharing any `gram` tokens in a row with them is dropped, since calibration windows
    start at random offsets and overlap (a third of the held-out tokens did, 1,024 windows of stdlib text)."""
    n = min(held_out, len(windows) // 8) or (1 if len(windows) > 1 else 0)
    if n == 0:
        return windows, windows
    train, held = windows[:-n], windows[-n:]
    gram = min(gram, windows.shape[1])
    seen = {tuple(w[i : i + gram]) for w in held.tolist() for i in range(len(w) - gram + 1)}
    keep = [
        j
        for j, w in enumerate(train.tolist())
        if all(tuple(w[i : i + gram]) not in seen for i in range(len(w) - gram + 1))
    ]
    if not keep:
        raise LmforgeError("every calibration window overlaps the held-out ones; give a longer calibration text")
    return train[keep], held


def next_token_loss(model: nn.Module) -> Loss:
    return lambda x: model(x[:, :-1], x[:, 1:])


@torch.no_grad()
def held_out_loss(model: nn.Module, windows: Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss over every predicted token of the windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += model(batch[:, :-1], batch[:, 1:]).item() * n
        count += n
    model.train(was_training)
    return total / count


def build_optimizer(params: list[nn.Parameter], tc: SftTrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; only matrices decay."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)


def train(
    model: nn.Module,
    windows: Tensor,
    held: Tensor,
    tc: SftTrainConfig,
    run: Run | None,
    steps: int,
    loss_fn: Loss | None = None,
    params: list[nn.Parameter] | None = None,
    label: str = "recover",
    seed: int = 0,
) -> dict[str, float]:
    """Train `params` (default: every trainable parameter of model) for `steps` steps of tc.batch_size random
    windows under `loss_fn` (default: next-token loss), on tc.device; the model ends on the CPU in eval mode.
    Returns the held-out next-token loss before and after and the last training loss."""
    device = pick_device(tc.device)
    model.to(device)
    held_before = held_out_loss(model, held, tc.batch_size)
    summary = {f"{label}_held_out_before": held_before, f"{label}_held_out_after": held_before}
    if steps <= 0:
        model.cpu().eval()
        return summary
    loss_fn = loss_fn or next_token_loss(model)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    schedule = replace(tc, steps=steps)  # the multiplier reads steps, warmup and decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, schedule))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step, loss_value, start = 0, math.nan, time.perf_counter()
    if run is not None:
        run.log_metrics(dict(step=0, **{f"{label}_val_loss": held_before}), stage="compress")
    while step < steps:
        t0 = time.perf_counter()
        loss_value = 0.0
        for _ in range(tc.grad_accum):
            pick = torch.randint(0, len(windows), (min(tc.batch_size, len(windows)),), generator=generator)
            loss = loss_fn(windows[pick].to(device)) / tc.grad_accum
            loss.backward()
            loss_value += loss.item()
        grad_norm = optimizer_step(optimizer, scheduler, tc.grad_clip)
        step += 1
        if step % tc.log_every == 0 or step == steps:
            lr, dt = optimizer.param_groups[0]["lr"], time.perf_counter() - t0
            row = {f"{label}_loss": loss_value, "lr": lr, "grad_norm": grad_norm.item()}
            if run is not None:
                run.log_metrics(dict(step=step, **row), stage="compress")
            print(f"{label} step {step:>5}/{steps} | loss {loss_value:.4f} | lr {lr:.2e} | dt {dt * 1000:.0f} ms")
    after = held_out_loss(model, held, tc.batch_size)
    if run is not None:
        run.log_metrics(dict(step=steps, **{f"{label}_val_loss": after}), stage="compress")
    model.cpu().eval()
    summary.update(
        {
            f"{label}_held_out_after": after,
            f"{label}_train_loss": loss_value,
            f"{label}_windows": len(windows),
            f"{label}_seconds": round(time.perf_counter() - start, 2),
        }
    )
    return summary
