"""The alignment losses as functions of log-probabilities, rewards and masks, each equal to TRL 1.16's on the same
numbers (tests/align/test_losses.py runs TRL's own trainer code): the Bradley-Terry reward-model loss, DPO and its
relatives (IPO, hinge, KTO, ORPO, SimPO), GRPO's clipped objective, and PPO's clipped policy and value losses with
GAE and the adaptive KL controller (TRL 1.16 has no PPO; these follow its last PPOTrainer and are checked by hand).

Shapes: `*_logps` are (B,) summed reply log-probabilities unless named per-token, which are (B, T) with a mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# reward model (Ouyang et al., 2022; Llama 2's margin)


def bradley_terry_loss(
    chosen: Tensor, rejected: Tensor, margin: Tensor | None = None, center_coef: float = 0.0
) -> Tensor:
    """-log sigmoid(r_chosen - r_rejected [- margin]), averaged, plus center_coef * mean((r_c + r_r)^2): TRL's
    RewardTrainer with a `margin` column and center_rewards_coefficient (Eisenstein et al., 2023)."""
    delta = chosen - rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(delta).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


# DPO family (Rafailov et al., 2023; Azar et al., 2023; SLiC's hinge; Hong et al., 2024; Meng et al., 2024)


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, chosen rewards, rejected rewards); rewards are beta * (logp - ref_logp), detached, and delta is
    the chosen minus the rejected log-ratio. sigmoid: -log sigmoid(beta * delta), with label_smoothing e conservative
    DPO's -(1 - e) log sigmoid(beta delta) - e log sigmoid(-beta delta) (Mitchell, 2023; TRL's sigmoid until it moved
    smoothing to loss_type="robust", and still its CPO sigmoid); hinge: relu(1 - beta * delta) (SLiC); ipo:
    (delta' - 1/(2 beta))^2 (Azar et al., 2023, eq. 17) where delta' uses each side's log-ratio divided by its reply
    token count, as TRL does (agreed with the IPO authors), so the lengths are needed."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
    elif kind == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif kind == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo averages the log-ratios per token: give chosen_lengths and rejected_lengths")
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; choose sigmoid, hinge or ipo")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al., 2024, eq. 7) over single replies labelled desirable (bool (B,)): 1 - sigmoid(beta *
    (ratio - kl)) for desirable, 1 - sigmoid(beta * (kl - ratio)) for the rest, weighted, averaged over all replies.
    `kl` is the reference point as TRL computes it: the batch's mean of policy-minus-reference summed log-probs of
    mismatched pairs (each prompt with another example's reply), detached here and clamped at 0 after the mean."""
    ratio = logps - ref_logps
    kl = kl.detach().clamp(min=0)
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses.mean()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, chosen_nll: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """ORPO (Hong et al., 2024, eq. 6): chosen_nll - beta * mean(log sigmoid(log odds(chosen) - log odds(rejected))),
    the odds of each reply's per-token mean log-probability; beta is the paper's lambda. TRL's chosen_nll is
    token_mean_nll over the chosen sequences' prompt and reply tokens (every real token after the first), not the
    reply alone. Returns (loss, the log odds ratio per pair)."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))
    return chosen_nll - beta * F.logsigmoid(log_odds).mean(), log_odds.detach()


def token_mean_nll(token_logps: Tensor, mask: Tensor) -> Tensor:
    """-(sum of the masked per-token log-probabilities) / (their count): the NLL averaged over the batch's tokens."""
    mask = mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def simpo_loss(
    chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
) -> Tensor:
    """SimPO (Meng et al., 2024, eq. 6): -log sigmoid(beta * (mean logp_chosen - mean logp_rejected) - gamma), label-
    smoothed like conservative DPO, no reference model; gamma is the reward margin itself (TRL's simpo_gamma), not
    gamma / beta. This is TRL's CPOTrainer(loss_type="simpo") with cpo_alpha=0; TRL's default cpo_alpha=1 adds
    cpo_alpha * token_mean_nll over the chosen replies' tokens (CPO's behaviour cloning)."""
    z = beta * (chosen_mean_logps - rejected_mean_logps) - gamma
    losses = -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing
    return losses.mean()


# GRPO (Shao et al., 2024)


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True) -> Tensor:
    """(B,) rewards of consecutive groups -> reward minus its group's mean, divided by the group's std (+1e-4, TRL's)
    when `scale`."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3): non-negative, unbiased."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    loss_type: str = "grpo",
    max_new_tokens: int = 0,
    num_items: float | None = None,
) -> Tensor:
    """TRL's GRPOTrainer loss: the clipped surrogate -min(ratio A, clip(ratio, 1 +- epsilon) A) per token (B, T),
    plus beta * k3 KL after the clip, reduced by loss_type: grpo, each sequence's token mean, then the mean (Shao et
    al., 2024); bnpo, the mean over the batch's reply tokens; dr_grpo, the sum over B * max_new_tokens (Liu et al.,
    2025); dapo (TRL's default; Yu et al., 2025), the sum over num_items, the reply tokens of the whole generation
    batch, so the micro-batches of one generation batch add up to its token mean (default: this batch's tokens)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    a = advantages.unsqueeze(-1)
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * a)
    if beta:
        assert ref_logps is not None, "beta > 0 needs the reference's log-probabilities"
        per_token = per_token + beta * k3_kl(logps, ref_logps)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_new_tokens <= 0:
            raise ValueError("dr_grpo divides by B * max_new_tokens: give max_new_tokens > 0")
        return masked.sum() / (logps.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        return masked.sum() / max(num_items if num_items is not None else float(mask.sum()), 1.0)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose grpo, dapo, dr_grpo or bnpo")


# PPO (Schulman et al., 2017; Ziegler et al., 2019; Ouyang et al., 2022)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over reply tokens (B, T), mask marking them (contiguous per row); the value
    after a row's last token is 0. Returns (advantages, returns = advantages + values), both 0 off the mask."""
    mask = mask.to(values.dtype)
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    running = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * m  # off the reply: nothing carries over
        advantages[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value * 0)
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the masked entries (the mean kept when not shift_mean)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """Masked mean of max(-A ratio, -A clip(ratio, 1 +- clip_range)) per token (B, T)."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    return (losses * mask).sum() / mask.sum().clamp(min=1)


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float) -> Tensor:
    """Masked mean of 0.5 * max((V - R)^2, (clip(V, V_old +- clip_range) - R)^2) per token (B, T)."""
    mask = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    losses = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


class AdaptiveKL:
    """Ziegler et al.'s (2019) proportional controller: coef *= 1 + clip(KL / target - 1, +-0.2) * n / horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.coef *= 1 + error * n / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef = float(state["coef"])
