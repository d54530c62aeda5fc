"""Each alignment method's loss on a tiny float64 decoder: autograd's directional derivative along random directions
in parameter space equals the central finite difference of the loss, so one optimiser step moves along the true
gradient (masks, detached references and clipped branches included)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lmforge.align import losses
from lmforge.align.reward_model import ScoreModel
from lmforge.align.sequences import make_batch, reply_logprobs, token_logprobs
from lmforge.models import ModelConfig, build_model

CFG = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32, max_seq_len=32)
PAD = 0
PROMPTS = [[5, 9, 3], [11, 2], [4, 6, 8, 10]]
CHOSEN = [[7, 7, 12, 40], [30, 31], [50]]
REJECTED = [[22, 8], [17, 18, 19, 20, 21], [51, 52, 53]]


def decoder(seed: int):
    return build_model(CFG, seed=seed).double()


def check_gradient(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], directions: int = 3) -> None:
    """autograd's d/dt loss(params + t v) at t = 0 against (loss(+eps v) - loss(-eps v)) / (2 eps), v random unit."""
    eps, rtol = 1e-6, 1e-6
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for _ in range(directions):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        analytic = sum((g * x).sum() for g, x in zip(grads, v, strict=True)).item()
        with torch.no_grad():
            values = []
            for sign in (1.0, -1.0):
                for p, p0, x in zip(params, start, v, strict=True):
                    p.copy_(p0 + sign * eps * x)
                values.append(loss_fn().item())
            for p, p0 in zip(params, start, strict=True):
                p.copy_(p0)
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(analytic - numeric) <= rtol * max(abs(analytic), abs(numeric)) + 1e-10, (analytic, numeric)
        assert abs(analytic) > 1e-6  # a zero gradient would pass vacuously


@pytest.fixture(scope="module")
def pairs():
    """Chosen rows then rejected rows, and the frozen reference's reply log-probabilities of them."""
    batch = make_batch(PROMPTS * 2, CHOSEN + REJECTED, PAD)
    with torch.no_grad():
        ref = reply_logprobs(decoder(1), batch).sum(-1)
    return batch, ref


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = x.chunk(2)
    return chosen, rejected


@pytest.mark.parametrize(
    ("kind", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)]
)
def test_dpo_gradient(pairs, kind, label_smoothing):
    batch, ref = pairs
    model = decoder(0)

    def loss():
        logps = reply_logprobs(model, batch).sum(-1)
        lengths = halves(batch.lengths)
        out, _, _ = losses.dpo_loss(
            *halves(logps),
            *halves(ref),
            0.5,
            kind,
            label_smoothing,
            chosen_lengths=lengths[0],
            rejected_lengths=lengths[1],
        )
        return out

    check_gradient(loss, list(model.parameters()))


def test_kto_gradient(pairs):
    """The reference point, from mismatched pairs under the policy, is a constant of the step (TRL computes it
    without gradients): fixed at the step's weights, so the finite differences see the loss the gradient is of."""
    batch, ref = pairs
    mismatched = make_batch(PROMPTS * 2, (CHOSEN + REJECTED)[1:] + CHOSEN[:1], PAD)
    desirable = torch.tensor([True, True, True, False, False, False])
    model = decoder(0)
    with torch.no_grad():
        kl = (reply_logprobs(model, mismatched).sum(-1) - reply_logprobs(decoder(1), mismatched).sum(-1)).mean()
    assert kl > 0  # the reference point is in play, not clamped away

    def loss():
        logps = reply_logprobs(model, batch).sum(-1)
        return losses.kto_loss(logps, ref, desirable, kl, beta=0.5, undesirable_weight=1.3)

    check_gradient(loss, list(model.parameters()))


def mean_logps(model, batch) -> torch.Tensor:
    return reply_logprobs(model, batch).sum(-1) / batch.lengths


def test_orpo_gradient(pairs):
    batch, _ = pairs
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(PROMPTS * 2, CHOSEN + REJECTED, strict=True)])
    targets = torch.arange(batch.y.shape[1]) < (lengths - 1)[:, None]  # every real token after the first
    model = decoder(0)

    def loss():
        per_token = token_logprobs(model(batch.x), batch.y)
        nll = losses.token_mean_nll(halves(per_token)[0], halves(targets)[0])
        out, _ = losses.orpo_loss(*halves(mean_logps(model, batch)), nll, beta=0.25)
        return out

    check_gradient(loss, list(model.parameters()))


def test_simpo_gradient(pairs):
    batch, _ = pairs
    model = decoder(0)
    check_gradient(
        lambda: losses.simpo_loss(*halves(mean_logps(model, batch)), 2.0, 0.5, 0.1), list(model.parameters())
    )


def test_reward_model_gradient(pairs):
    """Bradley-Terry with margins and the centring penalty, on the scores after each row's last real token."""
    batch, _ = pairs
    rm = ScoreModel(decoder(0)).double()
    ids = torch.cat([batch.x[:, :1], batch.y], 1)  # the whole rows
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(PROMPTS * 2, CHOSEN + REJECTED, strict=True)])
    margin = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)

    assert rm.scores(ids, lengths).dtype == torch.float64  # float64 kept: finite differences resolve it
    check_gradient(
        lambda: losses.bradley_terry_loss(*halves(rm.scores(ids, lengths)), margin, 0.05), list(rm.parameters())
    )


def rollouts():
    """Two groups of two replies; one stops early, so its row ends in padding."""
    prompts = [[5, 9, 3], [5, 9, 3], [11, 2], [11, 2]]
    replies = [[7, 7, 12, 40], [30, 31], [50, 3, 1], [17, 18, 19, 20, 21]]
    return make_batch(prompts, replies, PAD)


@pytest.mark.parametrize(
    ("loss_type", "beta", "shift"), [("dapo", 0.04, 0.0), ("grpo", 0.0, 0.4), ("dr_grpo", 0.04, 0.4)]
)
def test_grpo_gradient(loss_type, beta, shift):
    """shift 0: TRL's default single iteration, old = the step's own log-probs, fixed (ratio 1 at the step);
    shift > 0: old log-probabilities perturbed so some tokens sit outside the clip range and pass no gradient."""
    batch = rollouts()
    model = decoder(0)
    with torch.no_grad():
        ref = reply_logprobs(decoder(1), batch)
        noise = shift * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
        old = (reply_logprobs(model, batch) + noise) * batch.mask
    advantages = losses.group_advantages(torch.tensor([1.0, 0.0, 0.3, 0.9], dtype=torch.float64), 2)

    def loss():
        logps = reply_logprobs(model, batch)
        return losses.grpo_loss(
            logps,
            old,
            advantages,
            batch.mask,
            0.2,
            beta,
            ref,
            loss_type,
            max_new_tokens=6,
            num_items=2 * float(batch.mask.sum()),
        )

    check_gradient(loss, list(model.parameters()))


def test_ppo_gradient():
    """Policy and value model together: clipped policy loss on whitened GAE advantages plus vf_coef times the clipped
    value loss, with the rollout's old log-probabilities, values and rewards fixed."""
    batch = rollouts()
    policy, critic = decoder(0), ScoreModel(decoder(2)).double()

    def values():
        return critic.values(batch.x)

    with torch.no_grad():
        old = reply_logprobs(policy, batch) + 0.3 * torch.randn(
            batch.mask.shape, generator=torch.Generator().manual_seed(2)
        )
        old = old * batch.mask
        old_values = values() + 0.3 * torch.randn(batch.mask.shape, generator=torch.Generator().manual_seed(3))
        rewards = torch.zeros_like(old_values)
        last = (batch.mask * torch.arange(batch.mask.shape[1])).argmax(-1)  # each reply's last token: the score
        rewards[torch.arange(4), last] = torch.tensor([1.0, -0.5, 0.2, 0.7], dtype=torch.float64)
        rewards = rewards - 0.05 * (old - reply_logprobs(decoder(1), batch))  # the per-token KL penalty
        advantages, returns = losses.gae(rewards, old_values, batch.mask, gamma=1.0, lam=0.95)
        advantages = losses.whiten(advantages, batch.mask)

    def loss():
        logps = reply_logprobs(policy, batch)
        policy_loss = losses.ppo_policy_loss(logps, old, advantages, batch.mask, 0.2)
        return policy_loss + 0.1 * losses.ppo_value_loss(values(), old_values, returns, batch.mask, 0.2)

    check_gradient(loss, list(policy.parameters()) + list(critic.parameters()))
