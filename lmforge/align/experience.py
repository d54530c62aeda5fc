"""PPO's experience: a step's rollouts made into a batch and scored (the reward model's score at the last reply token,
the per-token KL penalty -kl_coef * (logp - ref_logp) against the reference, values, GAE), and the held-out check of
reward and KL."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.align.config import AlignConfig
from lmforge.align.losses import gae, whiten
from lmforge.align.reward_model import ScoreModel
from lmforge.align.rollouts import sample_groups
from lmforge.align.sequences import SequenceBatch, make_batch, reply_logprobs
from lmforge.finetune.methods import Tuned


@dataclass
class Models:
    tuned: Tuned
    value: ScoreModel
    reference: torch.nn.Module
    reward: ScoreModel


@dataclass
class Experience:
    """One step's rollouts, scored: every tensor (B, T-1) over the batch's targets unless named per sequence (B,)."""

    batch: SequenceBatch
    logps: Tensor
    ref_logps: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor
    """(B,) the reward model's score, less the missing-end penalty."""
    finished: Tensor
    """(B,) bool: the reply ended by itself."""

    def rows(self, idx: Tensor) -> Experience:
        b = self.batch
        rest = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self) if f.name != "batch"}
        return Experience(SequenceBatch(b.x[idx], b.y[idx], b.mask[idx]), **rest)


def rollout_batch(prompts: list[list[int]], groups, pad_id: int) -> tuple[SequenceBatch, Tensor]:
    rollouts = [r for g in groups for r in g]
    batch = make_batch([r.prompt for r in rollouts], [r.reply for r in rollouts], pad_id)
    return batch, torch.tensor([r.finished for r in rollouts])


def last_reply_index(mask: Tensor) -> Tensor:
    """(B,) the position of each row's last reply target."""
    return mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1)


@torch.no_grad()
def score(reward: ScoreModel, batch: SequenceBatch) -> Tensor:
    """(B,) the reward model's score of each whole prompt-and-reply sequence."""
    ids = torch.cat([batch.x, batch.y[:, -1:]], dim=1)  # (B, T): make_batch's rows again
    return reward.scores(ids, last_reply_index(batch.mask) + 2)


@torch.no_grad()
def make_experience(models: Models, batch: SequenceBatch, finished: Tensor, kl_coef: float, cfg: AlignConfig):
    """Log-probs, values, per-token rewards (-kl_coef * (logp - ref_logp), the score added at the last reply token),
    then GAE; in micro-batches of train.batch_size."""
    pc, parts = cfg.ppo, []
    for idx in torch.arange(len(batch.x)).split(cfg.train.batch_size):
        b = SequenceBatch(batch.x[idx], batch.y[idx], batch.mask[idx])
        parts.append(
            (reply_logprobs(models.tuned, b), reply_logprobs(models.reference, b), models.value.values(b.x) * b.mask)
        )
    logps, ref_logps, values = (torch.cat(t) for t in zip(*parts, strict=True))
    scores = score(models.reward, batch) - pc.missing_eos_penalty * (~finished).float()
    mask = batch.mask
    rewards = -kl_coef * (logps - ref_logps) * mask  # k1, the estimator whose expectation is the KL
    rewards[torch.arange(len(mask)), last_reply_index(mask)] += scores
    if pc.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Experience(batch, logps, ref_logps, values, advantages, returns, scores, finished)


@torch.no_grad()
def evaluate(models: Models, tok, prompts: list[list[int]], cfg: AlignConfig, samples: int = 0) -> dict:
    """Held-out prompts answered once each (sampled as in training, with a fixed seed, so before and after compare
    like with like): the mean score, the mean KL to the reference (sum over reply tokens of logp - ref_logp) and
    the reply length; with `samples`, that many prompts and replies for the report."""
    rc = cfg.rollout
    groups = sample_groups(models.tuned.merged(), tok, prompts, 1, rc.max_new_tokens, rc.temperature, rc.top_p, 7)
    batch, finished = rollout_batch(prompts, groups, tok.pad_id)
    exp = make_experience(
        models,
        batch,
        finished,
        0.0,
        dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, missing_eos_penalty=0.0)),
    )
    kl = ((exp.logps - exp.ref_logps) * batch.mask).sum(-1)
    out = {
        "reward": exp.scores.mean().item(),
        "kl": kl.mean().item(),
        "reply_length": batch.lengths.float().mean().item(),
    }
    shown = [
        {"prompt": tok.decode(g[0].prompt), "completion": g[0].text, "score": s}
        for g, s in zip(groups[:samples], exp.scores.tolist(), strict=False)
    ]
    return {**out, "samples": shown} if samples else out
