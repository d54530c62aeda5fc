"""A reward model trained on preference pairs (Ouyang et al., 2022): the policy's backbone with a scalar head, the
Bradley-Terry loss on each pair's chosen and rejected scores, and the held-out share of pairs it orders right.

Run: `lmforge align --config configs/align/rm.yaml policy=RUN data.path=FILE run.name=NAME [--resume]`.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.align.config import AlignConfig, RewardModelConfig
from lmforge.align.losses import bradley_terry_loss
from lmforge.align.pairs import EncodedPair, describe_rejected, load_pairs, margins, pair_batch
from lmforge.align.reward_model import ScoreModel
from lmforge.checkpoint import load_run
from lmforge.config import to_dict
from lmforge.finetune import distributed
from lmforge.finetune.checkpointing import load_tuning, save_tuning
from lmforge.finetune.methods import tune
from lmforge.finetune.packing import RowLoader
from lmforge.finetune.sft import build_optimizer, optimizer_step
from lmforge.run import Run, resolve_run
from lmforge.train import parallel
from lmforge.train.progress import TrainProgress
from lmforge.train.schedule import lr_multiplier
from lmforge.train.steps import autocast_for, pick_device


def score_rows(pairs: list[EncodedPair], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids (2B, T), lengths (2B,)): the B whole chosen sequences, then the B rejected, right-padded."""
    batch = pair_batch(pairs, pad_id)
    ids = torch.cat([batch.x[:, :1], batch.y], 1)  # make_batch's inputs lack the last token, its targets the first
    lengths = [len(p.prompt) + len(p.chosen) for p in pairs] + [len(p.prompt) + len(p.rejected) for p in pairs]
    return ids, torch.tensor(lengths)


class PairLoss(nn.Module):
    """The Bradley-Terry loss of a batch of pairs as a forward pass (what DDP wraps)."""

    def __init__(self, score: ScoreModel, rc: RewardModelConfig):
        super().__init__()
        self.score, self.rc = score, rc

    def forward(self, ids: Tensor, lengths: Tensor, margin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        chosen, rejected = self.score.scores(ids, lengths).chunk(2)
        loss = bradley_terry_loss(chosen, rejected, margin if self.rc.margin else None, self.rc.center_coef)
        return loss, chosen.detach(), rejected.detach()


@torch.no_grad()
def held_out_accuracy(score: ScoreModel, pairs: list[EncodedPair], batch_size: int, pad_id: int, device) -> float:
    """Share of held-out pairs whose chosen reply scores strictly higher than the rejected one."""
    was_training = score.training
    score.eval()
    right = 0
    for i in range(0, len(pairs), batch_size):
        ids, lengths = score_rows(pairs[i : i + batch_size], pad_id)
        chosen, rejected = score.scores(ids.to(device), lengths.to(device)).chunk(2)
        right += int((chosen > rejected).sum())
    score.train(was_training)
    return right / len(pairs)


def train(cfg: AlignConfig, run: Run) -> dict[str, float]:
    tc = cfg.train
    ranks = distributed.start(cfg.parallel, pick_device(tc.device))
    device, lead = ranks.device, ranks.rank == 0
    policy = resolve_run(cfg.policy, cfg.run.root)
    backbone, tokenizer = load_run(policy, device)
    data = load_pairs(cfg.data, tokenizer, backbone.cfg.max_seq_len)
    pad = tokenizer.pad_id
    if lead:
        run.write_json("align_config.json", {**to_dict(cfg), "policy": str(policy)})
        tokenizer.save(run.path)
        if data.rejected:
            print(f"rejected: {describe_rejected(data.rejected)}", flush=True)

    torch.manual_seed(cfg.run.seed)  # the head (and LoRA's A) start alike on every rank
    tuned = tune(backbone.train(), cfg.peft)
    if backbone.lm_head.weight is not backbone.embed.weight:
        backbone.lm_head.requires_grad_(False)  # the score head replaces it: it gets no gradient
    score = ScoreModel(backbone)
    trainable, total = (n + score.head.weight.numel() for n in tuned.num_trainable())
    optimizer = build_optimizer(tuned, tc)
    optimizer.add_param_group({"params": [score.head.weight], "lr": tc.lr, "weight_decay": 0.0})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tc))
    loss_of = PairLoss(score, cfg.rm)
    if ranks.size > 1:  # as finetune/distributed.py: frozen weights are loaded alike everywhere, so no broadcast
        ids = [device] if device.type == "cuda" else None
        loss_of = nn.parallel.DistributedDataParallel(loss_of, device_ids=ids, broadcast_buffers=False)
    loader = RowLoader((torch.arange(len(data.train)),), tc.batch_size * ranks.size, cfg.run.seed)
    autocast = autocast_for(device, tc.dtype)
    evaluate = lambda: held_out_accuracy(score, data.val, tc.batch_size, pad, device)  # noqa: E731
    if lead:
        print(
            f"run {run.path} | reward model on {policy} | {cfg.peft.method}: {trainable:,} of {total:,} params trained"
            f" | {len(data.train)} train / {len(data.val)} held-out pairs",
            flush=True,
        )

    step = 0
    if cfg.resume:
        _, state, info = load_tuning(run, tuned, device)
        with torch.no_grad():
            score.head.weight.copy_(state["head"])
        for part, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("loader", loader)):
            obj.load_state_dict(state[part])
        step, before = int(info["step"]), float(info["accuracy_before"])
    else:
        with autocast():
            before = evaluate()
        if lead:
            run.log_metrics(dict(step=0, val_accuracy=before), stage="align")
    after, train_seconds, start_step, loss_value = before, 0.0, step, math.nan
    with TrainProgress(tc.steps, step, description="align", show=lead) as progress:
        while step < tc.steps:
            t0 = time.perf_counter()
            loss_sum, chosen_s, rejected_s = 0.0, [], []
            for micro in range(tc.grad_accum):
                (idx,) = distributed.my_rows(loader.next_batch(), ranks)
                picked = [data.train[i] for i in idx]
                ids, lengths = score_rows(picked, pad)
                with parallel.grad_sync(loss_of, micro == tc.grad_accum - 1):
                    with autocast():
                        loss, c, r = loss_of(ids.to(device), lengths.to(device), margins(picked).to(device))
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.item() / tc.grad_accum
                chosen_s.append(c)
                rejected_s.append(r)
            optimizer_step(optimizer, scheduler, tc.grad_clip)
            step += 1
            loss_value, _ = distributed.step_totals(loss_sum, 0, ranks)
            dt = time.perf_counter() - t0
            train_seconds += dt
            progress.update(step, loss_value, 0.0)
            if lead and (step % tc.log_every == 0 or step == tc.steps):
                c, r = torch.cat(chosen_s), torch.cat(rejected_s)
                row = dict(step=step, loss=loss_value, accuracy=(c > r).float().mean().item())
                row |= dict(reward_margin=(c - r).mean().item(), lr=optimizer.param_groups[0]["lr"])
                run.log_metrics(row, stage="align")
                progress.line(
                    f"step {step:>5}/{tc.steps} | loss {loss_value:.4f} | accuracy {row['accuracy']:.2f} | "
                    f"lr {row['lr']:.2e} | dt {dt * 1000:.0f} ms"
                )
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                with autocast():
                    after = evaluate()
                if lead:
                    run.log_metrics(dict(step=step, val_accuracy=after), stage="align")
                    progress.line(f"step {step:>5} | held-out accuracy {after:.3f}")
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
                if lead:
                    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                    state |= {"loader": loader.state_dict(), "head": score.head.weight.detach()}
                    info = {"stage": "align", "method": cfg.method, "accuracy_before": before}
                    save_tuning(run, step, tuned, state, info, tc.keep_last, extra_tensors=score.head_tensors())
                parallel.barrier()

    summary = {
        "steps": step,
        "val_accuracy_before": before,
        "val_accuracy_after": after,
        "train_loss": loss_value,
        "trainable_params": trainable,
        "train_seconds": train_seconds,
        "step_seconds": train_seconds / (step - start_step) if step > start_step else math.nan,
        "data_parallel_ranks": ranks.size,
    }
    if lead:
        data_info = {"path": cfg.data.path, "format": cfg.data.format, "train_pairs": len(data.train)}
        data_info |= {"held_out_pairs": len(data.val), "rejected": dict(data.rejected)}
        run.write_json("align.json", {"method": cfg.method, "data": data_info, "training": summary})
        run.close()
    parallel.destroy()
    return {**summary, "rejected": sum(data.rejected.values())}
