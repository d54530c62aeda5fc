"""PPO's value model: a ScoreModel started from the reward model, backbone and head (Ouyang et al., 2022, whose value
function starts from the reward model), or from the policy's backbone with a new head, trained through the same PEFT
method as the policy (its head always trains)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor

from lmforge.align.reward_model import ScoreModel
from lmforge.checkpoint import load_run
from lmforge.finetune.methods import PeftConfig, tune


def build_value_model(init: str, reward: ScoreModel, policy_run: Path, peft: PeftConfig, device) -> ScoreModel:
    """A trainable value model: `init` is "reward" (a copy of the frozen reward model) or "policy" (the policy run's
    backbone, loaded again, with a head of small random weights)."""
    if init == "reward":
        value = copy.deepcopy(reward)
    else:
        backbone, _ = load_run(policy_run, device)
        value = ScoreModel(backbone)
    tune(value.backbone, peft)  # wraps or freezes in place, as for the policy
    value.head.requires_grad_(True)
    return value.eval()


def value_state(value: ScoreModel) -> dict[str, Tensor]:
    """The value model's trained weights by name (what a resumable checkpoint holds)."""
    return {n: p.detach() for n, p in value.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_value_state(value: ScoreModel, state: dict[str, Tensor]) -> None:
    own = dict(value.named_parameters())
    for name, t in state.items():
        own[name].copy_(t)
