"""Direct preference optimisation and its relatives on preference pairs: DPO (Rafailov et al., 2023), IPO, SLiC's
hinge, KTO, ORPO and SimPO, with the frozen reference's log-probabilities computed once before training.

Run: `lmforge align --config configs/align/dpo.yaml policy=RUN data.path=FILE run.name=NAME [dpo.loss=ipo] [--resume]`.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from lmforge.align import losses
from lmforge.align.config import AlignConfig, DpoConfig
from lmforge.align.pairs import (
    EncodedPair,
    PackedSequences,
    describe_rejected,
    load_pairs,
    pack_sequences,
    packed_pairs,
)
from lmforge.align.sequences import token_logprobs
from lmforge.checkpoint import load_run
from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.finetune import distributed
from lmforge.finetune.checkpointing import load_tuning, save_tuning
from lmforge.finetune.methods import Tuned, tune
from lmforge.finetune.packing import RowLoader
from lmforge.finetune.sft import build_optimizer, optimizer_step
from lmforge.models import Decoder
from lmforge.models.packed import PackedRows
from lmforge.run import Run, resolve_run
from lmforge.train import parallel
from lmforge.train.progress import TrainProgress
from lmforge.train.schedule import lr_multiplier
from lmforge.train.steps import autocast_for, pick_device

REFERENCE_FREE = ("orpo", "simpo")


def kto_items(
    pairs: list[EncodedPair], block: int, limit: int
) -> tuple[list[tuple[list[int], list[int]]], Tensor, list]:
    """KTO's single replies (each pair's chosen is desirable, its rejected not) and, for each, TRL's mismatched
    (prompt, reply) pair for the KL reference point: the reply of the item before it within blocks of `block`, cut to
    fit `limit` tokens."""
    items = [(p.prompt, r) for p in pairs for r in (p.chosen, p.rejected)]
    desirable = torch.tensor([i % 2 == 0 for i in range(len(items))])
    mismatched = []
    for start in range(0, len(items), block):
        chunk = items[start : start + block]
        mismatched += [(p, chunk[i - 1][1][: max(1, limit - len(p))]) for i, (p, _) in enumerate(chunk)]
    return items, desirable, mismatched


def kto_batch(items: list, mismatched: list, pad_id: int, context: int) -> PackedSequences:
    """The B replies after their prompts (sequences 0..B-1), then the same prompts with their mismatched replies."""
    both = items + mismatched
    return pack_sequences([p for p, _ in both], [r for _, r in both], pad_id, context)


def sequence_logps(model: nn.Module, packed: PackedSequences) -> Tensor:
    """(n,) each packed sequence's summed reply log-probability under `model` (a Decoder or a finetune Tuned). The
    head runs on reply positions only (for a plain Tuned or Decoder): the prompts' logits are never made."""
    scored = packed.owner >= 0
    decoder = model.model if isinstance(model, Tuned) else model
    if isinstance(model, Decoder) or type(model).logits is Tuned.logits:
        hidden = decoder.hidden_states(packed.x, PackedRows(packed.segments))  # (R, W, C)
        logps = token_logprobs(decoder.lm_head(decoder.norm(hidden[scored])), packed.y[scored])  # (N,)
    else:  # soft prompts and prefixes change the forward pass around the decoder
        logps = token_logprobs(model.logits(packed.x, packed.segments), packed.y)[scored]
    sums = torch.zeros(packed.n, dtype=logps.dtype, device=logps.device)
    return sums.index_add(0, packed.owner[scored], logps)


class Objective(nn.Module):
    """One loss of the family as a forward pass (what DDP wraps): the policy's summed reply log-probabilities of 2B
    packed sequences (B chosen then B rejected; KTO: B replies, B mismatched ones apart) against the reference's
    (B, 2); `lengths` (2B,) counts each reply's tokens."""

    def __init__(self, tuned: nn.Module, dc: DpoConfig, ranks: distributed.Ranks):
        super().__init__()
        self.tuned, self.dc, self.ranks = tuned, dc, ranks

    def forward(
        self, packed: PackedSequences, lengths: Tensor, ref: Tensor, desirable: Tensor | None = None, kl_packed=None
    ) -> tuple[Tensor, Tensor, Tensor]:
        dc = self.dc
        if dc.loss == "kto":  # packed: the B replies; kl_packed: their mismatched ones, which need no gradient
            logps = sequence_logps(self.tuned, packed)
            with torch.no_grad():
                kl = (sequence_logps(self.tuned, kl_packed) - ref[:, 1]).mean()
                if self.ranks.size > 1:  # TRL gathers the estimate over processes
                    dist.all_reduce(kl)
                    kl = kl / self.ranks.size
            loss = losses.kto_loss(
                logps, ref[:, 0], desirable, kl, dc.beta, dc.kto_desirable_weight, dc.kto_undesirable_weight
            )
            rewards = dc.beta * (logps - ref[:, 0]).detach()
            return loss, rewards[desirable], rewards[~desirable]
        lengths = lengths.to(torch.float32)
        (chosen, rejected), (n_chosen, n_rejected) = sequence_logps(self.tuned, packed).chunk(2), lengths.chunk(2)
        if dc.loss == "orpo":
            nll = -chosen.sum() / n_chosen.sum()
            loss, _ = losses.orpo_loss(chosen / n_chosen, rejected / n_rejected, nll, dc.beta)
            return loss, dc.beta * (chosen / n_chosen).detach(), dc.beta * (rejected / n_rejected).detach()
        if dc.loss == "simpo":
            loss = losses.simpo_loss(
                chosen / n_chosen, rejected / n_rejected, dc.beta, dc.simpo_gamma, dc.label_smoothing
            )
            return loss, dc.beta * (chosen / n_chosen).detach(), dc.beta * (rejected / n_rejected).detach()
        return losses.dpo_loss(
            chosen, rejected, ref[:, 0], ref[:, 1], dc.beta, dc.loss, dc.label_smoothing, n_chosen, n_rejected
        )


@torch.no_grad()
def paired_logps(model: nn.Module, batches: list[PackedSequences], device) -> Tensor:
    """(N, 2) summed reply log-probabilities of each packed batch's first and second half of sequences (chosen and
    rejected, or a KTO reply and its mismatched one), without gradients, on the CPU."""
    was_training = model.training
    model.eval()
    out = [torch.stack(sequence_logps(model, b.to(device)).float().cpu().chunk(2), 1) for b in batches]
    model.train(was_training)
    return torch.cat(out)


def pair_lengths(pairs: list[EncodedPair]) -> Tensor:
    """(N, 2) reply tokens of each pair's chosen and rejected reply."""
    return torch.tensor([[len(p.chosen), len(p.rejected)] for p in pairs], dtype=torch.float32)


def held_out(
    model, val: list[PackedSequences], lengths: Tensor, ref: Tensor, dc: DpoConfig, device
) -> tuple[float, float]:
    """(accuracy, mean margin) of the implicit reward on held-out pairs: beta * (logp - ref logp), or for orpo and
    simpo beta times the per-token mean logp; a tie counts half (at the start every margin is 0 and the accuracy is
    0.5, chance; TRL's strict count would report 0)."""
    r = paired_logps(model, val, device)
    r = r / lengths if dc.loss in REFERENCE_FREE else r - ref
    margin = dc.beta * (r[:, 0] - r[:, 1])
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(), margin.mean().item()


def load_reference(cfg: AlignConfig, model, tokenizer, device):
    """The frozen reference run's model, refused unless it reads the policy's tokens the same way."""
    path = resolve_run(cfg.reference, cfg.run.root)
    ref, ref_tok = load_run(path, device)
    if ref.cfg.vocab_size != model.cfg.vocab_size or ref_tok.inner.get_vocab() != tokenizer.inner.get_vocab():
        raise LmforgeError(
            f"reference {path} has another vocabulary ({ref.cfg.vocab_size} vs the policy's {model.cfg.vocab_size} "
            "embeddings or other tokens); give a reference with the policy's tokenizer, or none (the policy itself)"
        )
    return ref


def train(cfg: AlignConfig, run: Run) -> dict[str, float]:
    tc, dc = cfg.train, cfg.dpo
    ranks = distributed.start(cfg.parallel, pick_device(tc.device))
    device, lead = ranks.device, ranks.rank == 0
    policy = resolve_run(cfg.policy, cfg.run.root)
    model, tokenizer = load_run(policy, device)
    uses_reference = dc.loss not in REFERENCE_FREE
    # checked before anything is written: a reference with another vocabulary leaves the run folder untouched
    reference = load_reference(cfg, model, tokenizer, device) if uses_reference and cfg.reference else model
    data = load_pairs(cfg.data, tokenizer, model.cfg.max_seq_len)
    pad, context = tokenizer.pad_id, model.cfg.max_seq_len
    chunks = lambda n, size: [slice(i, i + size) for i in range(0, n, size)]  # noqa: E731
    if dc.loss == "kto":
        items, desirable, mismatched = kto_items(data.train, tc.batch_size, context + 1)
        lengths = torch.tensor([len(r) for _, r in items], dtype=torch.float32)
        train_batches = [kto_batch(items[c], mismatched[c], pad, context) for c in chunks(len(items), 64)]
    else:
        train_batches = [packed_pairs(data.train[c], pad, context) for c in chunks(len(data.train), 64)]
        lengths = pair_lengths(data.train)
    val_batches = [packed_pairs(data.val[c], pad, context) for c in chunks(len(data.val), 64)]
    val_lengths = pair_lengths(data.val)
    if lead:
        run.write_json("align_config.json", {**to_dict(cfg), "policy": str(policy)})
        tokenizer.save(run.path)
        if data.rejected:
            print(f"rejected: {describe_rejected(data.rejected)}", flush=True)

    t0 = time.perf_counter()
    ref_train = ref_val = torch.zeros(0, 2)
    if uses_reference:  # computed once: the reference is never run during training
        with autocast_for(device, tc.dtype)():  # the policy's precision: at step 0 every log-ratio is exactly 0
            ref_train = paired_logps(reference, train_batches, device)
            ref_val = paired_logps(reference, val_batches, device)
    del reference
    ref_seconds = time.perf_counter() - t0

    torch.manual_seed(cfg.run.seed)  # LoRA's A starts alike on every rank
    tuned = tune(model.train(), cfg.peft)
    trainable, total = tuned.num_trainable()
    optimizer = build_optimizer(tuned, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tc))
    objective = Objective(tuned, dc, ranks)
    loss_of = objective
    if ranks.size > 1:  # as finetune/distributed.py: frozen weights are loaded alike everywhere, so no broadcast
        ids = [device] if device.type == "cuda" else None
        loss_of = nn.parallel.DistributedDataParallel(objective, device_ids=ids, broadcast_buffers=False)
    n_items = len(items) if dc.loss == "kto" else len(data.train)
    loader = RowLoader((torch.arange(n_items),), tc.batch_size * ranks.size, cfg.run.seed)
    autocast = autocast_for(device, tc.dtype)
    if lead:
        print(
            f"run {run.path} | policy {policy} | dpo.loss={dc.loss} | {cfg.peft.method}: {trainable:,} of {total:,} "
            f"params trained | {len(data.train)} train / {len(data.val)} held-out pairs | reference log-probs in "
            f"{ref_seconds:.1f}s | {ranks.size} data-parallel rank(s)",
            flush=True,
        )

    step = 0
    if cfg.resume:
        _, state, info = load_tuning(run, tuned, device)
        for part, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("loader", loader)):
            obj.load_state_dict(state[part])
        step, before = int(info["step"]), (info["accuracy_before"], info["margin_before"])
    else:
        with autocast():
            before = held_out(tuned, val_batches, val_lengths, ref_val, dc, device)
        if lead:
            run.log_metrics(dict(step=0, val_accuracy=before[0], val_margin=before[1]), stage="align")
    after, train_seconds, start_step, loss_value = before, 0.0, step, math.nan
    with TrainProgress(tc.steps, step, description="align", show=lead) as progress:
        while step < tc.steps:
            t0 = time.perf_counter()
            loss_sum, chosen_r, rejected_r = 0.0, [], []
            for micro in range(tc.grad_accum):
                (idx,) = distributed.my_rows(loader.next_batch(), ranks)
                if dc.loss == "kto":
                    batch, kl_batch = (
                        pack_sequences([part[i][0] for i in idx], [part[i][1] for i in idx], pad, context).to(device)
                        for part in (items, mismatched)
                    )
                    flags, n_tokens = desirable[idx].to(device), lengths[idx]
                else:
                    batch = packed_pairs([data.train[i] for i in idx], pad, context)
                    flags, n_tokens, kl_batch = None, lengths[idx].T.reshape(-1), None  # (2B,): chosen then rejected
                ref = ref_train[idx].to(device) if len(ref_train) else torch.zeros(len(idx), 2, device=device)
                with parallel.grad_sync(loss_of, micro == tc.grad_accum - 1):
                    with autocast():
                        loss, c, r = loss_of(batch.to(device), n_tokens.to(device), ref, flags, kl_batch)
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.item() / tc.grad_accum
                chosen_r.append(c.float())
                rejected_r.append(r.float())
            optimizer_step(optimizer, scheduler, tc.grad_clip)
            step += 1
            loss_value, _ = distributed.step_totals(loss_sum, 0, ranks)
            dt = time.perf_counter() - t0
            train_seconds += dt
            progress.update(step, loss_value, 0.0)
            if lead and (step % tc.log_every == 0 or step == tc.steps):
                row = _batch_metrics(torch.cat(chosen_r), torch.cat(rejected_r), dc.loss != "kto")
                row = dict(step=step, loss=loss_value, **row, lr=optimizer.param_groups[0]["lr"])
                run.log_metrics(row, stage="align")
                progress.line(
                    f"step {step:>5}/{tc.steps} | loss {loss_value:.4f} | margin {row['margin']:+.3f} | "
                    f"lr {row['lr']:.2e} | dt {dt * 1000:.0f} ms"
                )
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                with autocast():
                    after = held_out(tuned, val_batches, val_lengths, ref_val, dc, device)
                if lead:
                    run.log_metrics(dict(step=step, val_accuracy=after[0], val_margin=after[1]), stage="align")
                    progress.line(f"step {step:>5} | held-out accuracy {after[0]:.3f} | margin {after[1]:+.4f}")
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
                if lead:
                    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                    info = {"stage": "align", "method": cfg.method, "loss": dc.loss}
                    info |= {"accuracy_before": before[0], "margin_before": before[1]}
                    save_tuning(run, step, tuned, {**state, "loader": loader.state_dict()}, info, tc.keep_last)
                parallel.barrier()

    n_pairs = (step - start_step) * tc.batch_size * tc.grad_accum * ranks.size
    summary = {
        "steps": step,
        "val_accuracy_before": before[0],
        "val_accuracy_after": after[0],
        "val_margin_before": before[1],
        "val_margin_after": after[1],
        "train_loss": loss_value,
        "trainable_params": trainable,
        "reference_seconds": ref_seconds,
        "train_seconds": train_seconds,
        "pairs_per_s": n_pairs / train_seconds if train_seconds else math.nan,
        "data_parallel_ranks": ranks.size,
    }
    if lead:
        data_info = {"path": cfg.data.path, "format": cfg.data.format, "train_pairs": len(data.train)}
        data_info |= {"held_out_pairs": len(data.val), "rejected": dict(data.rejected)}
        run.write_json("align.json", {"method": cfg.method, "loss": dc.loss, "data": data_info, "training": summary})
        run.close()
    parallel.destroy()
    return {**summary, "rejected": sum(data.rejected.values())}


def _batch_metrics(chosen: Tensor, rejected: Tensor, paired: bool) -> dict[str, float]:
    mean = lambda t: t.mean().item() if t.numel() else 0.0  # noqa: E731  (a KTO batch may hold one kind only)
    row = {"rewards_chosen": mean(chosen), "rewards_rejected": mean(rejected)}
    row["margin"] = row["rewards_chosen"] - row["rewards_rejected"]
    if paired:
        row["accuracy"] = (chosen > rejected).float().mean().item()
    return row
