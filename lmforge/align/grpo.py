"""GRPO with verifiable rewards (Shao et al., 2024, DeepSeekMath): groups of replies sampled per prompt through the
serving engine, each scored by a checker, advantages normalised within the group, the clipped surrogate (plus a k3 KL
to a frozen reference when grpo.beta > 0), and the held-out greedy accuracy before, during and after.

Run: `lmforge align --config configs/align/grpo.yaml policy=RUN grpo.task=arithmetic run.name=NAME [--resume]`.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.align import losses
from lmforge.align.config import AlignConfig
from lmforge.align.rollouts import sample_groups
from lmforge.align.sequences import make_batch, reply_logprobs
from lmforge.align.verifiable_tasks import generate_tasks, read_tasks, split_tasks
from lmforge.align.verifiers import Task, score
from lmforge.checkpoint import load_run
from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.finetune import distributed
from lmforge.finetune.checkpointing import load_tuning, save_tuning
from lmforge.finetune.methods import tune
from lmforge.finetune.sft import build_optimizer
from lmforge.run import Run, resolve_run
from lmforge.train import parallel
from lmforge.train.schedule import lr_multiplier
from lmforge.train.steps import pick_device


def load_tasks(cfg: AlignConfig) -> tuple[list[Task], list[Task], Counter]:
    """(train, held-out, rejected records by reason): generated when grpo.task is set, else read from data.path."""
    g = cfg.grpo
    if g.task:
        knobs = dict(digits=g.digits, terms=g.terms, ops=g.ops, system=g.system, instruction=g.instruction)
        knobs |= dict(seed=cfg.run.seed, val_fraction=cfg.data.val_fraction)
        return (
            generate_tasks(g.task, g.train_tasks, "train", **knobs),
            generate_tasks(g.task, g.eval_prompts, "held_out", **knobs),
            Counter(),
        )
    if cfg.data.format not in ("gsm8k", "tasks"):
        raise LmforgeError(
            f"method=grpo reads verifiable tasks, not data.format={cfg.data.format}; set data.format=tasks or gsm8k"
        )
    tasks, rejected = read_tasks(cfg.data.path, cfg.data.format, g.system, g.instruction, cfg.data.limit)
    train, held = split_tasks(tasks, cfg.data.val_fraction)
    if not train or not held:
        reasons = ", ".join(f"{n} {why}" for why, n in rejected.items()) or "none rejected"
        raise LmforgeError(
            f"{cfg.data.path} leaves {len(train)} training and {len(held)} held-out tasks ({reasons}); give more "
            "records with a prompt and an answer (or tests)"
        )
    return train, held[: g.eval_prompts], rejected


class _Policy(nn.Module):
    """The tuned model's reply log-probabilities as a forward pass, which DDP needs for its gradient all-reduce."""

    def __init__(self, tuned):
        super().__init__()
        self.tuned = tuned

    def forward(self, batch):
        return reply_logprobs(self.tuned, batch)


@torch.no_grad()
def accuracy(tuned, tokenizer, tasks: list[Task], cfg: AlignConfig) -> tuple[float, list[dict]]:
    """Greedy held-out accuracy through the engine, and the first few (prompt, reply, answer, reward) for the report."""
    prompts = [tokenizer.encode_chat(t.prompt, add_generation_prompt=True, bos=True) for t in tasks]
    groups = sample_groups(tuned.merged(), tokenizer, prompts, 1, cfg.rollout.max_new_tokens, temperature=0.0)
    replies = [g[0].text for g in groups]
    s = score(replies, tasks, cfg.grpo.checker, cfg.grpo.timeout_s)
    shown = [
        {"prompt": t.prompt[-1]["content"], "reply": r, "answer": t.answer, "reward": w}
        for t, r, w in list(zip(tasks, replies, s.rewards, strict=True))[:3]
    ]
    return sum(s.rewards) / len(tasks), shown


def step_seed(seed: int, step: int, first: int) -> int:
    """The sampling seed of a step's rollouts from the global request index `first` on (sample_groups adds each
    request's index): a resumed run, or one with the same global batch over more ranks, draws the same replies."""
    return (seed * 1_000_003 + step) * 1_000_000 + first


def train(cfg: AlignConfig, run: Run) -> dict[str, float]:
    tc, rc, gc = cfg.train, cfg.rollout, cfg.grpo
    ranks = distributed.start(cfg.parallel, pick_device(tc.device))
    device, lead = ranks.device, ranks.rank == 0
    policy = resolve_run(cfg.policy, cfg.run.root)
    model, tokenizer = load_run(policy, device)
    train_tasks, held_out, rejected = load_tasks(cfg)
    if lead:
        run.write_json("align_config.json", {**to_dict(cfg), "policy": str(policy)})
        tokenizer.save(run.path)
    torch.manual_seed(cfg.run.seed)
    tuned = tune(model.train(), cfg.peft)
    if not tuned.merges:
        raise LmforgeError(
            f"peft.method={cfg.peft.method} does not fold into a plain decoder, which GRPO's rollouts sample from; "
            "use full, freeze, lora or qlora"
        )
    reference = None
    if gc.beta > 0:
        reference = load_run(resolve_run(cfg.reference or cfg.policy, cfg.run.root), device)[0]
        reference.eval().requires_grad_(False)
    optimizer = build_optimizer(tuned, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tc))
    policy_fn = _Policy(tuned)
    if ranks.size > 1:
        policy_fn = DistributedDataParallel(policy_fn, broadcast_buffers=False, find_unused_parameters=False)
    step, curve, failures = 0, [], Counter()
    if cfg.resume:
        _, state, info = load_tuning(run, tuned, device)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, curve, failures = int(info["step"]), info["curve"], Counter(info["checker_failures"])
    elif lead:
        acc, _ = accuracy(tuned, tokenizer, held_out, cfg)
        curve.append({"step": 0, "accuracy": acc})
        run.log_metrics({"step": 0, "held_out_accuracy": acc}, stage="align")
    if lead:
        print(
            f"run {run.path} | policy {policy} | {cfg.peft.method} | {len(train_tasks)} train / {len(held_out)} "
            f"held-out tasks | {rc.prompts_per_step} prompts x {rc.group_size} replies per rank per step | "
            f"{ranks.size} rank(s) | held-out accuracy {curve[0]['accuracy']:.3f}",
            flush=True,
        )
    gen_seconds = update_seconds = 0.0
    start_step = step
    while step < tc.steps:
        t0 = time.perf_counter()
        picks = random.Random(f"{cfg.run.seed}/{step}").choices(
            range(len(train_tasks)), k=rc.prompts_per_step * ranks.size
        )
        tasks = [
            train_tasks[i] for i in picks[ranks.rank * rc.prompts_per_step : (ranks.rank + 1) * rc.prompts_per_step]
        ]
        prompts = [tokenizer.encode_chat(t.prompt, add_generation_prompt=True, bos=True) for t in tasks]
        groups = sample_groups(
            tuned.merged(), tokenizer, prompts, rc.group_size, rc.max_new_tokens, rc.temperature, rc.top_p,
            seed=step_seed(cfg.run.seed, step, ranks.rank * len(prompts) * rc.group_size),
        )  # fmt: skip
        rollouts = [r for g in groups for r in g]
        scores = score(
            [r.text for r in rollouts], [t for t in tasks for _ in range(rc.group_size)], gc.checker, gc.timeout_s
        )
        failures.update(scores.failures)
        rewards = torch.tensor(scores.rewards)
        advantages = losses.group_advantages(rewards, rc.group_size, gc.scale_rewards)
        t1 = time.perf_counter()
        stats = _update(policy_fn, tuned, reference, optimizer, rollouts, advantages, tokenizer.pad_id, cfg, ranks)
        scheduler.step()
        step += 1
        t2 = time.perf_counter()
        gen_seconds, update_seconds = gen_seconds + t1 - t0, update_seconds + t2 - t1
        flat = (rewards.view(-1, rc.group_size).std(dim=1) == 0).float().mean()  # groups that teach nothing
        totals = _mean_over_ranks([rewards.mean().item(), (rewards == 1).float().mean().item(), flat.item()], ranks)
        row = dict(step=step, reward=totals[0], accuracy=totals[1], flat_groups=totals[2], **stats)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row |= dict(reply_tokens=sum(len(r.reply) for r in rollouts) / len(rollouts), gen_s=t1 - t0, update_s=t2 - t1)
        if lead and (step % tc.log_every == 0 or step == tc.steps):
            run.log_metrics(row, stage="align")
            print(
                f"step {step:>5}/{tc.steps} | reward {row['reward']:.3f} | loss {row['loss']:+.4f} | "
                f"reply {row['reply_tokens']:.1f} tok | gen {t1 - t0:.1f}s update {t2 - t1:.1f}s",
                flush=True,
            )
        if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
            if lead:
                acc, shown = accuracy(tuned, tokenizer, held_out, cfg)
                curve.append({"step": step, "accuracy": acc})
                run.log_metrics({"step": step, "held_out_accuracy": acc}, stage="align")
                print(f"step {step:>5} | held-out accuracy {acc:.3f}", flush=True)
            parallel.barrier()
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
            if lead:
                state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                info = {"stage": "align", "method": "grpo", "curve": curve, "checker_failures": dict(failures)}
                save_tuning(run, step, tuned, state, info, tc.keep_last)
            parallel.barrier()
    return _finish(cfg, run, tuned, tokenizer, held_out, train_tasks, rejected, curve, failures, ranks, step,
                   start_step, gen_seconds, update_seconds)  # fmt: skip


def _update(policy_fn, tuned, reference, optimizer, rollouts, advantages, pad_id, cfg, ranks) -> dict[str, float]:
    """grpo.iterations optimizer steps on one batch of rollouts, in micro-batches of train.batch_size replies."""
    gc, n = cfg.grpo, len(rollouts)
    micro = [list(range(i, min(i + cfg.train.batch_size, n))) for i in range(0, n, cfg.train.batch_size)]
    batches = [make_batch([rollouts[i].prompt for i in m], [rollouts[i].reply for i in m], pad_id) for m in micro]
    batches = [b.to(ranks.device) for b in batches]
    tokens = float(sum(b.mask.sum() for b in batches))
    if ranks.size > 1:  # dapo and bnpo divide by all ranks' reply tokens; DDP averages, hence the size
        t = torch.tensor([tokens], dtype=torch.float64)
        dist.all_reduce(t)
        tokens = t.item() / ranks.size
    with torch.no_grad():
        refs = [reply_logprobs(reference, b) for b in batches] if reference is not None else [None] * len(batches)
        olds = [reply_logprobs(tuned, b) for b in batches] if gc.iterations > 1 else [None] * len(batches)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = kl_sum = 0.0
    for _ in range(gc.iterations):
        for m, batch, ref, old in zip(micro, batches, refs, olds, strict=True):
            logps = policy_fn(batch)
            weight = len(m) / n if gc.loss_type in ("grpo", "dr_grpo") else 1.0
            loss = losses.grpo_loss(
                logps, logps.detach() if old is None else old, advantages[m].to(logps.device), batch.mask,
                gc.epsilon, gc.beta, ref, "dapo" if gc.loss_type == "bnpo" else gc.loss_type,
                cfg.rollout.max_new_tokens, tokens,
            ) * weight  # fmt: skip
            loss.backward()
            loss_sum += loss.item() / gc.iterations
            if ref is not None:
                kl_sum += float((losses.k3_kl(logps.detach(), ref) * batch.mask).sum()) / gc.iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss_sum, "grad_norm": float(grad_norm)}
    if reference is not None:
        out["kl"] = kl_sum / max(float(sum(b.mask.sum() for b in batches)), 1.0)
    values = _mean_over_ranks(list(out.values()), ranks)
    return dict(zip(out, values, strict=True))


def _mean_over_ranks(values: list[float], ranks) -> list[float]:
    if ranks.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return [v / ranks.size for v in t.tolist()]


def _finish(cfg, run, tuned, tokenizer, held_out, train_tasks, rejected, curve, failures, ranks, step, start_step,
            gen_seconds, update_seconds) -> dict[str, float]:  # fmt: skip
    """Write align.json (rank 0) and return the summary."""
    if ranks.rank == 0 and curve[-1]["step"] != step:  # resumed at the last step: the loop did not evaluate
        curve.append({"step": step, "accuracy": accuracy(tuned, tokenizer, held_out, cfg)[0]})
    before, after = (curve[0]["accuracy"], curve[-1]["accuracy"]) if curve else (math.nan, math.nan)
    steps_run = max(step - start_step, 1)
    summary = {
        "steps": step,
        "held_out_accuracy_before": before,
        "held_out_accuracy_after": after,
        "gain_points": 100 * (after - before),
        "generation_seconds": gen_seconds,
        "update_seconds": update_seconds,
        "step_seconds": (gen_seconds + update_seconds) / steps_run,
        "checker_failures": float(sum(failures.values())),
        "rejected": float(sum(rejected.values())),
        "data_parallel_ranks": ranks.size,
    }
    if ranks.rank == 0:
        _, shown = accuracy(tuned, tokenizer, held_out[:3], cfg)
        run.write_json(
            "align.json",
            {
                "tasks": {"train": len(train_tasks), "held_out": len(held_out), "rejected": dict(rejected)},
                "held_out_curve": curve,
                "checker_failures": dict(failures),
                "training": summary,
                "samples": shown,
            },
        )
        run.close()
    parallel.destroy()
    return summary
