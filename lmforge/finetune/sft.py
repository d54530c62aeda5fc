"""Supervised fine-tuning on conversations: the loss on the assistant's tokens only, examples packed without attending
to each other, a held-out loss before and after, and checkpoints that generate, serve and export read unchanged.

Run: `lmforge finetune --config configs/finetune/sft.yaml base=RUN data.path=FILE data.format=alpaca run.name=NAME
[--resume]`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from lmforge.checkpoint import load_run
from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.finetune import distributed, memory
from lmforge.finetune.checkpointing import load_tuning, save_tuning
from lmforge.finetune.config import FinetuneConfig, SftTrainConfig
from lmforge.finetune.formats import Conversation, load_conversations
from lmforge.finetune.methods import Tuned, tune
from lmforge.finetune.packing import Example, RowLoader, pack
from lmforge.finetune.template import encode_example, marked, shifted
from lmforge.run import Run, resolve_run
from lmforge.sampling import generate_tokens
from lmforge.train import parallel
from lmforge.train.progress import TrainProgress
from lmforge.train.schedule import lr_multiplier
from lmforge.train.steps import autocast_for, pick_device


@dataclass
class SftData:
    train: list[Example]
    val: list[Example]
    val_conversations: list[Conversation]
    rejected: Counter
    shown: str
    """The first training example, trained spans in [[...]]."""


def prepare_data(cfg: FinetuneConfig, tokenizer, seq_len: int) -> SftData:
    """Read, split (by a hash of each conversation) and encode the data; every rejected record is counted by reason."""
    conversations, rejected = load_conversations(cfg.data.path, cfg.data.format)
    fitting = []
    for conversation in conversations:
        ids, trained = encode_example(tokenizer, conversation)
        if len(ids) - 1 > seq_len:
            rejected[f"longer than the context ({seq_len + 1} tokens)"] += 1
        else:
            fitting.append((hashlib.sha256(json.dumps(conversation).encode()).digest(), conversation, ids, trained))
    fitting.sort(key=lambda item: item[0])
    n_val = min(len(fitting) - 1, max(1, round(cfg.data.val_fraction * len(fitting))))
    val, train = fitting[:n_val], fitting[n_val:]
    splits = {"train": [shifted(ids, t) for _, _, ids, t in train], "val": [shifted(ids, t) for _, _, ids, t in val]}
    if not splits["train"] or not splits["val"]:
        reasons = ", ".join(f"{n} {why}" for why, n in rejected.items()) or "none rejected"
        raise LmforgeError(
            f"{cfg.data.path} leaves {len(splits['train'])} training and {len(splits['val'])} held-out conversations "
            f"({reasons}); give more {cfg.data.format} records that fit the context"
        )
    shown = marked(tokenizer, train[0][2], train[0][3])
    return SftData(splits["train"], splits["val"], [c for _, c, _, _ in val], rejected, shown)


def build_optimizer(tuned: Tuned, tc: SftTrainConfig) -> torch.optim.AdamW:
    """AdamW over the method's parameter groups, each split so that only matrices decay."""
    groups = []
    for group in tuned.param_groups(tc.lr):
        params = group["params"]
        for decay, keep in ((tc.weight_decay, lambda p: p.ndim >= 2), (0.0, lambda p: p.ndim < 2)):
            chosen = [p for p in params if keep(p)]
            if chosen:
                groups.append({**group, "params": chosen, "weight_decay": decay})
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8)


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm to grad_clip (0: no clipping), step the optimizer and the schedule, and clear the
    gradients; returns the norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@torch.no_grad()
def held_out_loss(tuned: Tuned, rows, batch_size: int, autocast, packing: bool) -> float:
    """Mean loss per trained token over all held-out rows (each token weighted once however the batches fall)."""
    was_training = tuned.training
    tuned.eval()
    device = next(tuned.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows[0]), batch_size):
        x, y, seg = (t[start : start + batch_size].to(device) for t in rows)
        n = int((y != -100).sum())
        if n:
            with autocast():
                total += tuned.loss(x, y, seg if packing else None).item() * n
            count += n
    tuned.train(was_training)
    return total / count


def main(cfg: FinetuneConfig, run: Run) -> dict[str, float]:
    tc = cfg.train
    ranks = distributed.start(cfg.parallel, pick_device(tc.device))
    device, lead = ranks.device, ranks.rank == 0
    base = resolve_run(cfg.base, cfg.run.root)
    model, tokenizer = load_run(base, device, dense=True)  # a compressed base trains dequantized
    seq_len = cfg.data.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise LmforgeError(f"data.seq_len={seq_len} exceeds the base model's context {model.cfg.max_seq_len}")
    data = prepare_data(cfg, tokenizer, seq_len)
    rows = pack(data.train, seq_len, tokenizer.pad_id, cfg.data.packing)
    val_rows = pack(data.val, seq_len, tokenizer.pad_id, cfg.data.packing)
    if lead:
        run.write_json("finetune_config.json", {**to_dict(cfg), "base": str(base)})
        tokenizer.save(run.path)
        print(f"example (trained tokens in [[...]]):\n{data.shown}\n", flush=True)
        if data.rejected:
            print("rejected: " + ", ".join(f"{n} {why}" for why, n in sorted(data.rejected.items())), flush=True)

    torch.manual_seed(cfg.run.seed)  # the new weights (LoRA's A, adapters, prompts) start alike on every rank
    tuned = tune(model.train(), cfg.peft)
    if tc.activation_checkpointing:
        memory.recompute_blocks(model)
    trainable, total = tuned.num_trainable()
    optimizer = build_optimizer(tuned, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tc))
    loss_of = distributed.loss_module(tuned, ranks)
    loader = RowLoader(rows, tc.batch_size * ranks.size, cfg.run.seed)  # global batches: each rank takes its share
    autocast = autocast_for(device, tc.dtype)
    val_set = (val_rows, tc.batch_size, autocast, cfg.data.packing)  # every rank evaluates all: no gather needed
    if lead:
        print(
            f"run {run.path} | base {base} | {cfg.peft.method}: {trainable:,} of {total:,} params trained | "
            f"{len(data.train)} train / {len(data.val)} held-out conversations in {len(rows[0])} rows of {seq_len} | "
            f"{ranks.size} data-parallel rank(s)",
            flush=True,
        )
    step = 0
    if cfg.resume:
        step, val_before = _resume(run, tuned, optimizer, scheduler, loader, device)
    else:
        torch.manual_seed(cfg.run.seed)
        val_before = held_out_loss(tuned, *val_set)
        if lead:
            run.log_metrics(dict(step=0, val_loss=val_before), stage="finetune")

    losses: list[float] = []
    val_loss, train_seconds, tokens, start_step = val_before, 0.0, 0, step
    load_peak = memory.peak_bytes(
        device
    )  # loading (and quantising) the base; training's own peak is measured from here
    memory.return_freed(device)
    train_peak = memory.reset_peak(device)
    with TrainProgress(tc.steps, step, description="finetune", show=lead) as progress:
        while step < tc.steps:
            t0 = time.perf_counter()
            loss_sum, step_tokens = 0.0, 0
            for micro in range(tc.grad_accum):
                x, y, seg = (t.to(device) for t in distributed.my_rows(loader.next_batch(), ranks))
                share = distributed.token_share(y, ranks)  # 1.0 on one process
                with parallel.grad_sync(loss_of, micro == tc.grad_accum - 1):
                    with autocast():
                        loss = loss_of(x, y, seg if cfg.data.packing else None) * share / tc.grad_accum
                    loss.backward()
                loss_sum += loss.item()
                step_tokens += int((seg >= 0).sum())  # not padding
            grad_norm = optimizer_step(optimizer, scheduler, tc.grad_clip)
            train_peak = max(train_peak, memory.peak_bytes(device))
            step += 1
            loss_sum, step_tokens = distributed.step_totals(loss_sum, step_tokens, ranks)
            dt = time.perf_counter() - t0
            train_seconds, tokens = train_seconds + dt, tokens + step_tokens
            losses.append(loss_sum)
            progress.update(step, loss_sum, step_tokens / dt)
            if lead and (step % tc.log_every == 0 or step == tc.steps):
                lr = optimizer.param_groups[0]["lr"]
                eta = (tc.steps - step) * train_seconds / (step - start_step)
                row = dict(step=step, loss=loss_sum, lr=lr, tokens_per_s=step_tokens / dt, grad_norm=grad_norm.item())
                run.log_metrics(row, stage="finetune")
                progress.line(
                    f"step {step:>6}/{tc.steps} | loss {loss_sum:.4f} | lr {lr:.2e} | dt {dt * 1000:.0f} ms | "
                    f"{step_tokens / dt:,.0f} tok/s | ETA {eta:.0f}s"
                )
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                val_loss = held_out_loss(tuned, *val_set)
                if lead:
                    run.log_metrics(dict(step=step, val_loss=val_loss), stage="finetune")
                    progress.line(f"step {step:>6} | held-out loss {val_loss:.4f}")
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
                if lead:
                    _save(run, step, tuned, optimizer, scheduler, loader, val_before, tc.keep_last)
                parallel.barrier()
                memory.reset_peak(device)  # saving copies the weights: not training's memory

    summary = {
        "steps": step,
        "val_loss_before": val_before,
        "val_loss_after": val_loss,
        "train_loss": losses[-1] if losses else math.nan,
        "trainable_params": trainable,
        "trainable_share": trainable / total,
        "train_seconds": train_seconds,
        "step_seconds": train_seconds / (step - start_step) if step > start_step else math.nan,
        "tokens_per_s": tokens / train_seconds if train_seconds else math.nan,
        "peak_memory_bytes": max(load_peak, train_peak),
        "train_peak_memory_bytes": train_peak,
        "data_parallel_ranks": ranks.size,
    }
    if not lead:
        parallel.destroy()
        return {**summary, "rejected": sum(data.rejected.values())}
    # greedy answers need a plain decoder; an adapter or soft-prompt run is read back with load_trainable_state
    samples = (
        answers(tuned.merged(), tokenizer, data.val_conversations[: tc.samples], tc.max_new_tokens)
        if tuned.merges
        else []
    )
    run.write_json(
        "finetune.json",
        {
            "data": {
                "path": cfg.data.path,
                "format": cfg.data.format,
                "train_conversations": len(data.train),
                "held_out_conversations": len(data.val),
                "rows": len(rows[0]),
                "rejected": dict(data.rejected),
            },
            "training": summary,
            "samples": samples,
        },
    )
    run.close()
    parallel.destroy()  # after rank 0 wrote finetune.json, so no rank returns before it
    return {**summary, "rejected": sum(data.rejected.values())}


@torch.no_grad()
def answers(model, tokenizer, conversations: list[Conversation], max_new_tokens: int) -> list[dict]:
    """Greedy answers to the prompts before each conversation's last assistant turn (the reference beside them)."""
    model.eval()
    stops = {tokenizer.eos_id, tokenizer.end_of_turn_id}
    out = []
    for conversation in conversations:
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        prompt = conversation[:last]
        ids = tokenizer.encode_chat(prompt, add_generation_prompt=True, bos=True)
        if len(ids) >= model.cfg.max_seq_len:
            continue
        new = list(generate_tokens(model, ids, max_new_tokens, stop_ids=stops))
        ended = len(new) < min(max_new_tokens, model.cfg.max_seq_len - len(ids))
        out.append(
            {
                "prompt": tokenizer.render_chat(prompt, add_generation_prompt=True),
                "completion": tokenizer.decode(new),
                "reference": conversation[last]["content"],
                "ended_turn": ended,
            }
        )
    return out


def _save(run: Run, step: int, tuned: Tuned, optimizer, scheduler, loader, val_before: float, keep_last: int) -> None:
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "loader": loader.state_dict()}
    save_tuning(run, step, tuned, state, {"stage": "finetune", "val_loss_before": val_before}, keep_last)


def _resume(run: Run, tuned: Tuned, optimizer, scheduler, loader, device) -> tuple[int, float]:
    """Load the newest complete checkpoint's training state; return its step and the held-out loss before training."""
    _, state, info = load_tuning(run, tuned, device)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    return int(info["step"]), float(info["val_loss_before"])
