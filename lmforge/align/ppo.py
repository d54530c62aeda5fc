"""PPO against a reward model with a per-token KL penalty to the frozen reference (Ziegler et al., 2019; Ouyang et al.,
2022), with the conventions of "The N implementation details of RLHF with PPO" (Huang et al., 2024): rollouts through
the serving engine, the score added at the last reply token, GAE, whitened advantages, clipped policy and value
losses in one AdamW step per minibatch, and a fixed or adaptive KL coefficient.

Run: `lmforge align --config configs/align/ppo.yaml policy=RUN ppo.reward=RM_RUN data.path=FILE run.name=NAME
[--resume]`.
"""

from __future__ import annotations

import copy
import math
import random
import time

import torch
import torch.distributed as dist
from torch import Tensor

from lmforge.align.config import AlignConfig
from lmforge.align.experience import Experience, Models, evaluate, make_experience, rollout_batch
from lmforge.align.losses import AdaptiveKL, ppo_policy_loss, ppo_value_loss
from lmforge.align.prompts import load_prompts
from lmforge.align.reward_model import load_score_model
from lmforge.align.rollouts import sample_groups
from lmforge.align.sequences import reply_logprobs
from lmforge.align.value import build_value_model, load_value_state, value_state
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

MERGING = ("full", "freeze", "lora", "qlora")
"""The PEFT methods that fold into a plain decoder, which the rollout engine runs."""


def load_models(cfg: AlignConfig, device) -> tuple[Models, object]:
    """The tuned policy, its value model, the frozen reference and reward model, and the policy's tokenizer; the
    reward model and reference must share the policy's tokenizer (their scores read the policy's token ids)."""
    if cfg.data.format not in ("prompts", "hh_rlhf"):
        raise LmforgeError(f"method=ppo reads prompts, not data.format={cfg.data.format}; set data.format=prompts")
    if cfg.peft.method not in MERGING:
        raise LmforgeError(
            f"peft.method={cfg.peft.method} cannot be merged into a plain decoder, which the rollout engine runs; "
            f"use peft.method={', '.join(MERGING)}"
        )
    root = cfg.run.root
    policy_path, reward_path = resolve_run(cfg.policy, root), resolve_run(cfg.ppo.reward, root)
    model, tok = load_run(policy_path, device)
    reward, reward_tok = load_score_model(reward_path, device)
    if reward_tok.sha256 != tok.sha256 or reward.backbone.cfg.vocab_size != model.cfg.vocab_size:
        raise LmforgeError(
            f"ppo.reward={reward_path} reads another tokenizer ({reward_tok.vocab_size} tokens) than the policy "
            f"{policy_path} ({tok.vocab_size} tokens); train the reward model on the policy's tokenizer"
        )
    if cfg.reference:
        reference, ref_tok = load_run(resolve_run(cfg.reference, root), device)
        if ref_tok.sha256 != tok.sha256:
            raise LmforgeError(
                f"reference={cfg.reference} reads another tokenizer than the policy; give one that shares it"
            )
    else:
        reference = copy.deepcopy(model)
    torch.manual_seed(cfg.run.seed)  # new weights (LoRA's A, a new head) start alike on every rank and every resume
    value = build_value_model(cfg.ppo.value_init, reward, policy_path, cfg.peft, device)
    tuned = tune(model, cfg.peft)
    for frozen in (reference, reward):
        frozen.requires_grad_(False).eval()
    # dropout stays off throughout, so the first minibatch's probability ratio is exactly 1
    return Models(tuned.eval(), value, reference, reward), tok


def update(models: Models, optimizer, exp: Experience, cfg: AlignConfig, step: int, ranks) -> dict[str, float]:
    """ppo.epochs passes over the rollouts in ppo.minibatches shuffled minibatches, one optimizer step each, the
    token-mean loss summed over micro-batches of train.batch_size by their share of the minibatch's tokens."""
    pc, tc = cfg.ppo, cfg.train
    B = len(exp.scores)
    order_rng = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)  # the same on resume
    params = [p for g in optimizer.param_groups for p in g["params"]]
    totals = dict(policy_loss=0.0, value_loss=0.0, clip_fraction=0.0, approx_kl=0.0, grad_norm=0.0)
    n_minibatches = 0
    for _ in range(pc.epochs):
        for mb in torch.randperm(B, generator=order_rng).chunk(pc.minibatches):
            tokens = exp.batch.mask[mb].sum().clamp(min=1)
            for micro in mb.split(tc.batch_size):
                e = exp.rows(micro)
                share = e.batch.mask.sum() / tokens
                logps = reply_logprobs(models.tuned, e.batch)
                values = models.value.values(e.batch.x)
                policy_loss = ppo_policy_loss(logps, e.logps, e.advantages, e.batch.mask, pc.clip_range)
                value_loss = ppo_value_loss(values, e.values, e.returns, e.batch.mask, pc.value_clip)
                ((policy_loss + pc.vf_coef * value_loss) * share).backward()
                with torch.no_grad():
                    m, log_ratio = e.batch.mask.float(), (logps - e.logps) * e.batch.mask
                    clipped = ((log_ratio.exp() - 1).abs() > pc.clip_range).float()
                    totals["policy_loss"] += float(policy_loss * share)
                    totals["value_loss"] += float(value_loss * share)
                    totals["clip_fraction"] += float((clipped * m).sum() / tokens)
                    totals["approx_kl"] += float((0.5 * log_ratio**2).sum() / tokens)  # Huang et al.'s estimate
            sync_grads(params, ranks)
            limit = tc.grad_clip if tc.grad_clip > 0 else math.inf
            totals["grad_norm"] += float(torch.nn.utils.clip_grad_norm_(params, limit))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_minibatches += 1
    return {k: v / n_minibatches for k, v in totals.items()}


def sync_grads(params: list[Tensor], ranks) -> None:
    """Average the gradients over data-parallel ranks (each rank trained on its own prompts)."""
    if ranks.size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= ranks.size


def mean_over_ranks(values: dict[str, float], ranks) -> dict[str, float]:
    if ranks.size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / ranks.size).tolist(), strict=True))


def build_optimizers(models: Models, cfg: AlignConfig):
    """One AdamW over the policy's and the value model's trained weights (matrices decay), as TRL's PPO trains
    its policy-and-value wrapper, and a per-PPO-step learning-rate schedule."""
    optimizer = build_optimizer(models.tuned, cfg.train)
    value_params = [p for p in models.value.parameters() if p.requires_grad]
    for decay, keep in ((cfg.train.weight_decay, lambda p: p.ndim >= 2), (0.0, lambda p: p.ndim < 2)):
        chosen = [p for p in value_params if keep(p)]
        if chosen:
            optimizer.add_param_group({"params": chosen, "lr": cfg.train.lr, "weight_decay": decay})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg.train))
    return optimizer, scheduler


def train(cfg: AlignConfig, run: Run) -> dict[str, float]:
    pc, rc, tc = cfg.ppo, cfg.rollout, cfg.train
    ranks = distributed.start(cfg.parallel, pick_device(tc.device))
    device, lead = ranks.device, ranks.rank == 0
    models, tok = load_models(cfg, device)
    context = cfg.data.max_len or models.tuned.model.cfg.max_seq_len
    if context - rc.max_new_tokens < 2:
        raise LmforgeError(
            f"rollout.max_new_tokens={rc.max_new_tokens} leaves no room for a prompt in {context} tokens"
        )
    train_prompts, val_prompts, rejected = load_prompts(cfg.data, tok, context - rc.max_new_tokens)
    val_prompts = val_prompts[: pc.eval_prompts]
    if lead:
        run.write_json(
            "align_config.json",
            {
                **to_dict(cfg),
                "policy": str(resolve_run(cfg.policy, cfg.run.root)),
                "ppo": {**to_dict(cfg.ppo), "reward": str(resolve_run(pc.reward, cfg.run.root))},
            },
        )
        tok.save(run.path)
    optimizer, scheduler = build_optimizers(models, cfg)
    kl_ctl = AdaptiveKL(pc.kl_coef, pc.kl_target, pc.kl_horizon)
    trainable, total = models.tuned.num_trainable()
    per_rank = max(1, rc.prompts_per_step // ranks.size)
    if lead:
        print(
            f"run {run.path} | ppo: {cfg.peft.method} policy ({trainable:,} of {total:,} params trained), value model "
            f"from the {pc.value_init} | {len(train_prompts)} train / {len(val_prompts)} held-out prompts | "
            f"{per_rank * ranks.size} prompts x {rc.group_size} replies per step on {ranks.size} rank(s)",
            flush=True,
        )
    step = 0
    if cfg.resume:
        _, state, info = load_tuning(run, models.tuned, device)
        load_value_state(models.value, state["value"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl"])
        step, before = int(info["step"]), info["before"]
    else:
        before = evaluate(models, tok, val_prompts, cfg)
        if lead:
            run.log_metrics(dict(step=0, val_reward=before["reward"], val_kl=before["kl"]), stage="align")
            print(f"held-out before: reward {before['reward']:.4f} | kl {before['kl']:.4f}", flush=True)

    gen_seconds = update_seconds = 0.0
    last: dict[str, float] = {}
    while step < tc.steps:
        t0 = time.perf_counter()
        picked = random.Random(f"{cfg.run.seed}-{step}").sample(
            range(len(train_prompts)), k=min(len(train_prompts), per_rank * ranks.size)
        )
        prompts = [train_prompts[i] for i in picked[ranks.rank :: ranks.size]]
        seed = cfg.run.seed * 1_000_000 + (step * ranks.size + ranks.rank) * len(prompts) * rc.group_size
        groups = sample_groups(
            models.tuned.merged(), tok, prompts, rc.group_size, rc.max_new_tokens, rc.temperature, rc.top_p, seed
        )
        batch, finished = rollout_batch(prompts, groups, tok.pad_id)
        kl_coef = kl_ctl.coef if pc.adaptive_kl else pc.kl_coef
        exp = make_experience(models, batch.to(device), finished.to(device), kl_coef, cfg)
        t1 = time.perf_counter()
        stats = update(models, optimizer, exp, cfg, step, ranks)
        scheduler.step()
        step += 1
        t2 = time.perf_counter()
        kl = ((exp.logps - exp.ref_logps) * exp.batch.mask).sum(-1)
        row = mean_over_ranks(
            dict(
                reward=exp.scores.mean().item(),
                kl=kl.mean().item(),
                non_score_reward=(-kl_coef * kl).mean().item(),
                **stats,
                reply_length=exp.batch.lengths.float().mean().item(),
                finished_share=exp.finished.float().mean().item(),
            ),
            ranks,
        )
        if pc.adaptive_kl:
            kl_ctl.update(row["kl"], len(exp.scores) * ranks.size)
        gen_seconds, update_seconds = gen_seconds + t1 - t0, update_seconds + t2 - t1
        row = dict(
            step=step,
            **row,
            kl_coef=kl_coef,
            lr=optimizer.param_groups[0]["lr"],
            gen_seconds=t1 - t0,
            update_seconds=t2 - t1,
        )
        last = row
        if lead:
            run.log_metrics(row, stage="align")
            if step % tc.log_every == 0 or step == tc.steps:
                print(
                    f"step {step:>5}/{tc.steps} | reward {row['reward']:.4f} | kl {row['kl']:.4f} | kl_coef "
                    f"{kl_coef:.4f} | policy {row['policy_loss']:.4f} | value {row['value_loss']:.4f} | clip "
                    f"{row['clip_fraction']:.3f} | len {row['reply_length']:.1f} | gen {t1 - t0:.1f}s "
                    f"update {t2 - t1:.1f}s",
                    flush=True,
                )
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
            held = evaluate(models, tok, val_prompts, cfg)
            if lead:
                run.log_metrics(dict(step=step, val_reward=held["reward"], val_kl=held["kl"]), stage="align")
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
            if lead:
                _save(run, step, models, optimizer, scheduler, kl_ctl, before, cfg)
            parallel.barrier()

    after = evaluate(models, tok, val_prompts, cfg, samples=tc.samples)
    summary = {
        "steps": step,
        "reward_before": before["reward"],
        "reward_after": after["reward"],
        "kl_before": before["kl"],
        "kl_after": after["kl"],
        "reply_length_before": before["reply_length"],
        "reply_length_after": after["reply_length"],
        "train_kl_last": last.get("kl", math.nan),
        "kl_coef_last": last.get("kl_coef", kl_ctl.coef if pc.adaptive_kl else pc.kl_coef),
        "trainable_params": trainable,
        "gen_seconds": gen_seconds,
        "update_seconds": update_seconds,
        "data_parallel_ranks": ranks.size,
    }
    if lead:
        run.log_metrics(dict(step=step, val_reward=after["reward"], val_kl=after["kl"]), stage="align")
        run.write_json(
            "align.json",
            {
                "data": {
                    "path": cfg.data.path,
                    "train_prompts": len(train_prompts),
                    "held_out_prompts": len(val_prompts),
                    "rejected": dict(rejected),
                },
                "training": summary,
                "samples": after["samples"],
            },
        )
        run.close()
    parallel.destroy()
    return summary


def _save(run: Run, step: int, models: Models, optimizer, scheduler, kl_ctl: AdaptiveKL, before: dict, cfg) -> None:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "value": value_state(models.value),
        "kl": kl_ctl.state_dict(),
    }
    info = {"stage": "align", "method": "ppo", "before": before, "value_init": cfg.ppo.value_init}
    save_tuning(run, step, models.tuned, state, info, cfg.train.keep_last)
