"""Each alignment loss against TRL's own code on the same numbers: TRL's trainer methods run on a tiny float64 Llama
(built bare with object.__new__, only the attributes the method reads set), and our function gets the per-token
log-probabilities TRL's forward produced. PPO, which TRL 1.16 no longer has, against hand-computed examples."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.align import losses
from lmforge.align.sequences import make_batch, token_logprobs

trl = pytest.importorskip("trl", minversion="1.16")  # the bare trainers carry 1.16's attributes
transformers = pytest.importorskip("transformers")
from accelerate import Accelerator  # noqa: E402
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, RewardTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, nanstd  # noqa: E402

ATOL = 1e-6
PAD = 0
# (prompt, chosen, rejected) token ids; no pad ids inside, lengths differ so padding and per-token means matter
PAIRS = [
    ([5, 9, 3], [7, 7, 12, 40], [22, 8]),
    ([11, 2], [30, 31], [17, 18, 19, 20, 21]),
    ([4, 6, 8, 10], [50], [51, 52, 53]),
]


def tiny_llama(seed: int, head: str = "lm") -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=PAD,
        num_labels=1,
    )
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if head == "lm" else transformers.LlamaForSequenceClassification
    return cls(cfg).double().eval()  # eval: TRL's trainers log under "eval" and scale no gradient accumulation


@pytest.fixture(scope="module")
def models():
    policy, reference = tiny_llama(0), tiny_llama(1)
    for model in (policy, reference):  # either can be the policy (the KTO test swaps them)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return policy, reference


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def bare(cls, accelerator, **attrs):
    """A TRL trainer without its __init__: only what the loss method reads, so the method itself runs unchanged."""
    trainer = object.__new__(cls)
    trainer.accelerator = accelerator
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


def rows(prompts: list[list[int]], replies: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, completion_mask) from our make_batch."""
    batch = make_batch(prompts, replies, PAD)
    ids = torch.cat([batch.x[:, :1], batch.y], 1)
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, replies, strict=True)])
    attention = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
    completion = torch.cat([torch.zeros_like(batch.mask[:, :1]), batch.mask], 1).long()
    return ids, attention, completion


def trl_token_logps(model, ids, attention, completion) -> torch.Tensor:
    """(B, T-1) the per-token log-probabilities TRL's fused head gives its loss (0 off the completion). They are
    float32 whatever the model's dtype (the head's softmax runs in float32), and TRL sums them in float32; summed
    the same way, our losses get the very sequence log-probabilities TRL's did, then compute in float64."""
    labels = ids.masked_fill(completion == 0, -100)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs


def test_fused_logps_are_our_reply_logprobs(models):
    """The numbers fed to both sides are the model's: TRL's fused head equals our token_logprobs on its logits."""
    policy, _ = models
    ids, attention, completion = rows([p for p, _, _ in PAIRS], [c for _, c, _ in PAIRS])
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=attention).logits
    ours = token_logprobs(logits[:, :-1], ids[:, 1:]) * completion[:, 1:]
    assert (ours - trl_token_logps(policy, ids, attention, completion)).abs().max() < 1e-5  # TRL's head: float32


def pair_batch():
    prompts = [p for p, _, _ in PAIRS] * 2
    replies = [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS]
    return rows(prompts, replies)  # TRL's layout: chosen rows, then rejected rows


def pair_sums(model, ids, attention, completion):
    per_token = trl_token_logps(model, ids, attention, completion)
    chosen, rejected = per_token.sum(-1).double().chunk(2)
    lengths = completion.sum(-1).chunk(2)
    return chosen, rejected, lengths


@pytest.mark.parametrize(
    ("kind", "beta"),
    [("sigmoid", 0.1), ("sigmoid", 2.0), ("hinge", 0.1), ("hinge", 1.0), ("ipo", 0.5), ("ipo", 2.0)],
)
def test_dpo_matches_trl(models, accelerator, kind, beta):
    policy, reference = models
    ids, attention, completion = pair_batch()
    trainer = bare(
        DPOTrainer,
        accelerator,
        model=policy,
        ref_model=reference,
        beta=beta,
        loss_types=[kind],
        loss_weights=[1.0],
        label_smoothing=0.0,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        use_weighting=False,
    )
    want = trainer._compute_loss(
        policy, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}, False
    )
    chosen, rejected, (chosen_len, rejected_len) = pair_sums(policy, ids, attention, completion)
    ref_chosen, ref_rejected, _ = pair_sums(reference, ids, attention, completion)
    got, chosen_rewards, _ = losses.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta, kind, chosen_lengths=chosen_len, rejected_lengths=rejected_len
    )
    assert abs(got.item() - want.item()) <= ATOL
    assert abs(chosen_rewards.mean().item() - trainer._metrics["eval"]["rewards/chosen"][-1]) <= ATOL


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_is_conservative_dpo(accelerator, label_smoothing):
    """TRL 1.16's DPO sigmoid ignores label_smoothing (it went to loss_type="robust"); our sigmoid keeps conservative
    DPO, -(1 - e) log s(beta d) - e log s(-beta d), which TRL still computes in CPOTrainer.cpo_loss("sigmoid") from a
    difference of its two inputs, here the policy-minus-reference log-ratios."""
    g = torch.Generator().manual_seed(3)
    chosen, rejected, ref_chosen, ref_rejected = (-20 * torch.rand(6, generator=g, dtype=torch.float64) for _ in "abcd")
    beta = 0.2
    trainer = bare(CPOTrainer, accelerator, alpha=0.0, beta=beta, loss_type="sigmoid", label_smoothing=label_smoothing)
    want, _, _ = trainer.cpo_loss(chosen - ref_chosen, rejected - ref_rejected)
    got, _, _ = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, "sigmoid", label_smoothing)
    assert abs(got.item() - want.mean().item()) <= ATOL


@pytest.mark.parametrize(("flip", "undesirable_weight"), [(False, 1.0), (True, 1.0), (False, 1.5), (True, 0.7)])
def test_kto_matches_trl(models, accelerator, flip, undesirable_weight):
    """KTO's reference point: the batch's mean policy-minus-reference log-ratio on mismatched (prompt, reply) pairs,
    clamped at 0 after the mean; flipping the models' roles makes it positive in one of the two cases."""
    policy, reference = models[::-1] if flip else models
    prompts = [p for p, _, _ in PAIRS] + [PAIRS[0][0]]
    replies = [c for _, c, _ in PAIRS] + [PAIRS[0][2]]
    labels = torch.tensor([True, False, True, False])
    ids, attention, completion = rows(prompts, replies)
    kl_ids, kl_attention, kl_completion = rows(prompts, replies[1:] + replies[:1])  # each prompt, the next reply
    trainer = bare(
        KTOTrainer,
        accelerator,
        model=policy,
        ref_model=reference,
        beta=0.1,
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=False,
        desirable_weight=1.0,
        undesirable_weight=undesirable_weight,
    )
    batch = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": labels,
    }
    want = trainer._compute_loss(policy, batch, False)

    def sums(model, *args):
        return trl_token_logps(model, *args).sum(-1).double()

    kl = (
        sums(policy, kl_ids, kl_attention, kl_completion) - sums(reference, kl_ids, kl_attention, kl_completion)
    ).mean()
    got = losses.kto_loss(
        sums(policy, ids, attention, completion),
        sums(reference, ids, attention, completion),
        labels,
        kl,
        beta=0.1,
        undesirable_weight=undesirable_weight,
    )
    assert abs(got.item() - want.item()) <= ATOL
    assert abs(kl.clamp(min=0).item() - trainer._metrics["eval"]["kl"][-1]) <= ATOL


def concatenated_pairs():
    """ORPO's and CPO's batch: chosen_* and rejected_* rows of one width, labels -100 on prompts and padding."""
    prompts = [p for p, _, _ in PAIRS]
    out = {}
    both = rows(prompts * 2, [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS])
    halves = zip(*(t.chunk(2) for t in both), strict=True)  # (chosen ids, attention, completion), then rejected's
    for side, (ids, attention, completion) in zip(("chosen", "rejected"), halves, strict=True):
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, attention
        out[f"{side}_labels"] = ids.masked_fill(completion == 0, -100)
    return out, both


def test_orpo_matches_trl(models, accelerator):
    """ORPO's loss is the chosen sequences' NLL (TRL: over prompt and reply tokens, averaged over the batch's tokens)
    minus lambda times the mean log-sigmoid of the log odds ratio of the replies' per-token mean log-probabilities."""
    policy, _ = models
    batch, (ids, attention, completion) = concatenated_pairs()
    beta = 0.25
    trainer = bare(ORPOTrainer, accelerator, beta=beta, is_encoder_decoder=False, padding_value=PAD)
    want, metrics = trainer.get_batch_loss_metrics(policy, batch)
    with torch.no_grad():
        per_token = token_logprobs(policy(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    reply = completion[:, 1:]
    means = (per_token * reply).sum(-1) / reply.sum(-1)
    chosen_per_token, _ = per_token.chunk(2)
    chosen_targets, _ = attention[:, 1:].chunk(2)  # every real token after the first: prompt and reply
    nll = losses.token_mean_nll(chosen_per_token, chosen_targets)
    got, log_odds = losses.orpo_loss(*means.chunk(2), nll, beta)
    assert abs(got.item() - want.item()) <= ATOL  # TRL's odds_ratio_loss runs in float32: 1e-6 still holds
    assert abs(log_odds.mean().item() - metrics["log_odds_chosen"]) <= ATOL
    assert abs(nll.item() - metrics["nll_loss"]) <= ATOL


@pytest.mark.parametrize(("label_smoothing", "cpo_alpha"), [(0.0, 0.0), (0.2, 0.0), (0.0, 1.0)])
def test_simpo_matches_trl_cpo(models, accelerator, label_smoothing, cpo_alpha):
    """SimPO is TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (TRL's default cpo_alpha=1 adds CPO's
    behaviour-cloning NLL of the chosen replies, token-averaged over the batch; the CPO-SimPO combination)."""
    policy, _ = models
    batch, (ids, attention, completion) = concatenated_pairs()
    beta, gamma = 2.0, 0.5
    trainer = bare(
        CPOTrainer,
        accelerator,
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        loss_type="simpo",
        alpha=0.0,
        cpo_alpha=cpo_alpha,
        is_encoder_decoder=False,
        pad_token_id=PAD,
    )
    want, _ = trainer.get_batch_loss_metrics(policy, batch)
    with torch.no_grad():
        per_token = token_logprobs(policy(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:])
    reply = completion[:, 1:]
    means = (per_token * reply).sum(-1) / reply.sum(-1)
    got = losses.simpo_loss(*means.chunk(2), beta, gamma, label_smoothing)
    if cpo_alpha:
        got = got + cpo_alpha * losses.token_mean_nll(per_token.chunk(2)[0], reply.chunk(2)[0])
    assert abs(got.item() - want.item()) <= ATOL


@pytest.mark.parametrize(("margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.1)])
def test_reward_model_matches_trl(accelerator, margin, center):
    model = tiny_llama(2, head="score")
    ids, attention, _ = pair_batch()
    inputs = {"input_ids": ids, "attention_mask": attention}
    margins = torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)
    if margin:
        inputs["margin"] = margins
    trainer = bare(RewardTrainer, accelerator, model=model)
    trainer.args.center_rewards_coefficient = center
    want = trainer.compute_loss(model, dict(inputs))
    with torch.no_grad():
        chosen, rejected = model(input_ids=ids, attention_mask=attention).logits.squeeze(-1).chunk(2)
    got = losses.bradley_terry_loss(chosen, rejected, margins if margin else None, center or 0.0)
    assert abs(got.item() - want.item()) <= ATOL


def test_group_advantages_follow_trl():
    """TRL's GRPO advantages (grpo_trainer.py, _generate_and_score_completions): reward minus its group's mean, over
    the group's std (TRL's nanstd, Bessel-corrected) + 1e-4 when scale_rewards="group"; unscaled for "none"."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    centred = rewards - grouped.mean(1).repeat_interleave(4)
    scaled = centred / (nanstd(grouped, dim=1).repeat_interleave(4) + 1e-4)
    # nanstd's Bessel factor count / (count - 1) is an integer division, so float32: agreement to ~1e-8, not 1e-16
    assert torch.allclose(losses.group_advantages(rewards, 4), scaled, atol=ATOL, rtol=0)
    assert torch.allclose(losses.group_advantages(rewards, 4, scale=False), centred, atol=1e-12, rtol=0)


GRPO_CASES = [
    ("dapo", 0.0),
    ("dapo", 0.04),
    ("grpo", 0.0),
    ("grpo", 0.04),
    ("bnpo", 0.0),
    ("bnpo", 0.04),
    ("dr_grpo", 0.0),
    ("dr_grpo", 0.04),
]


@pytest.mark.parametrize(("loss_type", "beta"), GRPO_CASES)
def test_grpo_matches_trl(models, accelerator, loss_type, beta):
    """TRL's layout: prompts left-padded, completions right-padded (ending early where a reply stopped); old
    log-probabilities shifted so the ratio leaves the clip range both ways."""
    policy, reference = models
    P, C, epsilon, max_completion_length = 4, 5, 0.2, 6
    prompts = [[5, 9, 3], [11, 2], [4, 6, 8, 10], [11, 2]]
    completions = [[7, 7, 12, 40, 41], [30, 31], [50], [17, 18, 19]]
    prompt_ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    prompt_mask = (prompt_ids != PAD).long()
    completion_ids = torch.tensor([c + [PAD] * (C - len(c)) for c in completions])
    completion_mask = (completion_ids != PAD).long()
    ids, attention = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :-C] = -100
    with torch.no_grad():
        logps = policy(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs[:, -C:]
        ref_logps = reference(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs
    ref_logps = ref_logps[:, -C:]
    old_logps = logps + 0.4 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0), dtype=logps.dtype)
    advantages = losses.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64), 2)
    num_items = 2 * completion_mask.sum()  # dapo: the whole generation batch's tokens, here twice this micro-batch's
    trainer = bare(
        GRPOTrainer,
        accelerator,
        model=policy,
        loss_type=loss_type,
        beta=beta,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        max_completion_length=max_completion_length,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
    )
    trainer.args.use_bias_correction_kl, trainer.args.delta = False, None
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "num_items_in_batch": num_items,
    }
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    want = trainer._compute_loss(policy, inputs)
    got = losses.grpo_loss(
        logps.double(),
        old_logps.double(),
        advantages,
        completion_mask,
        epsilon,
        beta,
        ref_logps.double(),
        loss_type,
        max_new_tokens=max_completion_length,
        num_items=float(num_items),
    )
    assert abs(got.item() - want.item()) <= ATOL
    assert 0 < trainer._metrics["eval"]["clip_ratio/region_mean"][-1] < 1  # the clip acted on some tokens


# PPO: TRL 1.16 has no PPO trainer, so hand-computed examples with the formula beside each


def test_gae_by_hand():
    """Row 0: two prompt tokens, a 3-token reply; row 1: one prompt token, a reply that ends after 2 tokens.
    delta_t = r_t + gamma V_{t+1} - V_t (V after the reply's last token = 0); A_t = delta_t + gamma lam A_{t+1}."""
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 0.1, -0.2, 1.0, 0.0], [0.0, 0.3, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 9.0, 0.5, 0.4, 0.3, 9.0], [9.0, 0.2, 0.1, 9.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    # row 0: d4 = 1.0 - 0.3 = 0.7; d3 = -0.2 + 0.9*0.3 - 0.4 = -0.33; d2 = 0.1 + 0.9*0.4 - 0.5 = -0.04
    #        A4 = 0.7; A3 = -0.33 + 0.72*0.7 = 0.174; A2 = -0.04 + 0.72*0.174 = 0.08528
    # row 1: d2 = 0.5 - 0.1 = 0.4; d1 = 0.3 + 0.9*0.1 - 0.2 = 0.19; A2 = 0.4; A1 = 0.19 + 0.72*0.4 = 0.478
    want = torch.tensor([[0, 0, 0.08528, 0.174, 0.7, 0], [0, 0.478, 0.4, 0, 0, 0]], dtype=torch.float64)
    advantages, returns = losses.gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, want, atol=1e-12, rtol=0)
    assert torch.allclose(returns, (want + values) * mask, atol=1e-12, rtol=0)


def test_whiten_by_hand():
    x = torch.tensor([[5.0, 1.0, 2.0, 3.0], [7.0, 4.0, 5.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    # masked entries 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3
    z = [(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in (1.0, 2.0, 3.0, 4.0)]
    want = torch.tensor([[0, z[0], z[1], z[2]], [0, z[3], 0, 0]], dtype=torch.float64)
    assert torch.allclose(losses.whiten(x, mask), want, atol=1e-12, rtol=0)
    kept = torch.tensor([[0, z[0], z[1], z[2]], [0, z[3], 0, 0]], dtype=torch.float64) + 2.5 * mask
    assert torch.allclose(losses.whiten(x, mask, shift_mean=False), kept, atol=1e-12, rtol=0)


def test_ppo_policy_loss_by_hand():
    """Per token max(-A r, -A clip(r, 1 +- 0.2)), masked mean."""
    ratio = [1.5, 0.5, 1.1, 0.7, 2.0]
    adv = [1.0, 1.0, -2.0, -1.0, 3.0]
    mask = [1, 1, 1, 1, 0]
    # 1.5, A=1: max(-1.5, -1.2) = -1.2; 0.5, A=1: max(-0.5, -0.8) = -0.5; 1.1, A=-2: max(2.2, 2.2) = 2.2;
    # 0.7, A=-1: max(0.7, 0.8) = 0.8; masked out. Mean of the four: (-1.2 - 0.5 + 2.2 + 0.8) / 4 = 0.325
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], dtype=torch.float64)
    logps = old + torch.log(torch.tensor([ratio], dtype=torch.float64))
    got = losses.ppo_policy_loss(logps, old, torch.tensor([adv], dtype=torch.float64), torch.tensor([mask]), 0.2)
    assert abs(got.item() - 0.325) < 1e-12


def test_ppo_value_loss_by_hand():
    """Per token 0.5 max((V - R)^2, (V_old + clip(V - V_old, +-0.2) - R)^2), masked mean."""
    values = torch.tensor([[1.0, 0.0, 2.0, 5.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.1, 2.1, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    # t0: clipped 0.7, max(0, 0.09) = 0.09; t1: clipped 0.0 (inside), max(1, 1) = 1; t2: clipped 2.0, max(4, 4) = 4
    want = 0.5 * (0.09 + 1.0 + 4.0) / 3
    assert abs(losses.ppo_value_loss(values, old, returns, mask, 0.2).item() - want) < 1e-12


def test_adaptive_kl_by_hand():
    """coef *= 1 + clip(KL / target - 1, +-0.2) * n / horizon (Ziegler et al., 2019)."""
    ctl = losses.AdaptiveKL(coef=0.1, target=6.0, horizon=1000)
    assert abs(ctl.update(kl=12.0, n=100) - 0.1 * 1.02) < 1e-15  # error clipped at 0.2
    assert abs(ctl.update(kl=5.7, n=100) - 0.1 * 1.02 * (1 - 0.05 * 0.1)) < 1e-15
    state = ctl.state_dict()
    again = losses.AdaptiveKL(coef=1.0, target=6.0, horizon=1000)
    again.load_state_dict(state)
    assert again.coef == ctl.coef
