"""Alignment's settings (`lmforge align method=rm|dpo|ppo|grpo`): the policy run, the data, the loop, the method's
own knobs and the PEFT method that trains it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.checkpoint import latest_checkpoint
from lmforge.config import check
from lmforge.errors import LmforgeError
from lmforge.finetune.config import SftTrainConfig
from lmforge.finetune.distributed import check_layout
from lmforge.finetune.methods import PeftConfig
from lmforge.run import RunConfig, resolve_run
from lmforge.train.parallel import ParallelConfig

METHOD_NAMES = ("rm", "dpo", "ppo", "grpo")


@dataclass
class AlignDataConfig:
    path: str = ""
    """rm/dpo: preference pairs; ppo: prompts; grpo: verifiable tasks ({prompt, answer} or {prompt, tests} JSONL),
    or empty with grpo.task set to generate them."""
    format: Literal["hh_rlhf", "stack_exchange", "pairs", "prompts", "tasks", "gsm8k"] = "hh_rlhf"
    """hh_rlhf: {chosen, rejected} transcripts; stack_exchange: {question, response_j, response_k} (j preferred);
    pairs: {prompt, chosen, rejected} (prompt a string or a message list); prompts: {prompt} or hh_rlhf transcripts
    (their opening turns); tasks: {prompt, answer} or {prompt, tests}; gsm8k: {question, answer '... #### N'}."""
    val_fraction: float = 0.1
    """Share held out, split by a hash of each example's first prompt (so one prompt never lands on both sides)."""
    max_len: int = 0
    """Most tokens of prompt plus reply (0: the policy's context); longer examples are counted and skipped."""
    limit: int = 0
    """Read at most this many records (0: all)."""

    def validate(self) -> None:
        check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        check(self.max_len >= 0, f"data.max_len={self.max_len} must be >= 0 (0: the policy's context)")
        check(self.limit >= 0, f"data.limit={self.limit} must be >= 0 (0: all)")
        if self.path:
            check(Path(self.path).is_file(), f"data.path={self.path!r} is not a file; give a .json or .jsonl file")


@dataclass
class RewardModelConfig:
    margin: bool = False
    """Subtract the record's `margin` inside the Bradley-Terry sigmoid (Llama 2's margin loss), where one is given."""
    center_coef: float = 0.0
    """Penalise the mean squared reward by this (TRL's center_rewards_coefficient; 0: off)."""


@dataclass
class DpoConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "kto", "orpo", "simpo"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al., 2023); ipo: IPO (Azar et al., 2023); hinge: SLiC's hinge; kto: KTO (Ethayarajh
    et al., 2024) on each reply labelled desirable or not; orpo: ORPO (Hong et al., 2024), no reference; simpo:
    SimPO (Meng et al., 2024), length-normalised, no reference."""
    beta: float = 0.1
    """The implicit reward's scale (orpo: the odds-ratio term's weight lambda)."""
    label_smoothing: float = 0.0
    """sigmoid: conservative DPO's assumed share of flipped labels."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (subtracted after scaling by beta, as TRL's simpo_gamma)."""
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    """Prompts sampled per step."""
    group_size: int = 4
    """Samples per prompt (grpo: the group the advantages are normalised over; ppo: usually 1)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def validate(self) -> None:
        for name in ("prompts_per_step", "group_size", "max_new_tokens"):
            check(getattr(self, name) > 0, f"rollout.{name}={getattr(self, name)} must be positive")
        check(self.temperature >= 0 and 0 < self.top_p <= 1, "rollout.temperature must be >= 0, top_p in (0, 1]")


@dataclass
class PpoConfig:
    reward: str = ""
    """The reward model's run (trained with method=rm)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient against the frozen reference (the start of the adaptive controller)."""
    adaptive_kl: bool = False
    """Ziegler et al.'s (2019) controller: move kl_coef so the KL tracks kl_target over kl_horizon samples."""
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    """GAE's lambda."""
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    epochs: int = 4
    """Optimisation passes over each batch of rollouts."""
    minibatches: int = 1
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch before GAE, keeping their mean (TRL's whiten_rewards)."""
    value_init: Literal["reward", "policy"] = "reward"
    """The value model's start: the reward model, backbone and head (InstructGPT's choice), or the policy's backbone
    with a new head."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a reply cut off at max_new_tokens (TRL's missing_eos_penalty; 0: none)."""
    eval_prompts: int = 16
    """Held-out prompts answered before and after training (and every train.eval_every steps) for the reward and KL."""

    def validate(self) -> None:
        check(0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0, "ppo.gamma and ppo.lam must be in [0, 1]")
        for name in ("clip_range", "value_clip", "kl_target"):
            check(getattr(self, name) > 0, f"ppo.{name}={getattr(self, name)} must be positive")
        for name in ("epochs", "minibatches", "kl_horizon"):
            check(getattr(self, name) >= 1, f"ppo.{name}={getattr(self, name)} must be >= 1")
        check(self.kl_coef >= 0 and self.vf_coef >= 0, "ppo.kl_coef and ppo.vf_coef must be >= 0")
        check(self.eval_prompts >= 1, f"ppo.eval_prompts={self.eval_prompts} must be >= 1")


@dataclass
class GrpoConfig:
    task: Literal["", "arithmetic", "word_problems"] = ""
    """Generate verifiable tasks (with a held-out split) instead of reading data.path."""
    checker: Literal["math", "exact", "python"] = "math"
    """math: math-verify's equivalence of the final answer; exact: the stripped final answer equals the target;
    python: the reply's code passes the task's unit tests in a subprocess with limits."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "grpo"
    """grpo: each sequence's token mean, then the batch mean (Shao et al., 2024); dapo (TRL's default): tokens
    averaged over the whole batch; dr_grpo: divided by a fixed max_new_tokens; bnpo: tokens averaged per batch."""
    epsilon: float = 0.2
    """Clip range of the probability ratio."""
    beta: float = 0.0
    """KL penalty against the reference (k3 estimator); 0 loads no reference."""
    iterations: int = 1
    """Updates per batch of rollouts (mu); 1 makes the ratio 1 and the clip inert, as in TRL's default."""
    scale_rewards: bool = True
    """Divide each group's advantages by its reward std (false: Dr. GRPO's unscaled advantages)."""
    timeout_s: float = 5.0
    """Per-reply time limit of the checker."""
    eval_prompts: int = 100
    """Held-out tasks scored (greedy) before, during and after training."""
    train_tasks: int = 2000
    """grpo.task: how many distinct training tasks to generate."""
    digits: int = 2
    """grpo.task: digits of each number (difficulty)."""
    terms: int = 2
    """grpo.task=arithmetic: numbers per expression (difficulty)."""
    ops: str = "+"
    """grpo.task: the operators drawn from, any of '+-*'."""
    instruction: str = "Answer with the number only, after '####'."
    """Appended to each question of a generated or read task: the answer format the checker reads."""
    system: str = ""
    """A system message before each question (empty: none)."""

    def validate(self) -> None:
        for name in ("timeout_s", "eval_prompts", "train_tasks", "digits", "terms", "iterations"):
            check(getattr(self, name) > 0, f"grpo.{name}={getattr(self, name)} must be positive")
        check(self.beta >= 0 and self.epsilon > 0, "grpo.beta must be >= 0 and grpo.epsilon > 0")
        check(bool(self.ops) and set(self.ops) <= set("+-*"), f"grpo.ops={self.ops!r} must be some of '+-*'")


@dataclass
class AlignConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="align"))
    method: Literal["rm", "dpo", "ppo", "grpo"] = "dpo"
    policy: str = ""
    """The run to align (or to put a reward head on, for rm): its folder, or its name under run.root."""
    reference: str = ""
    """The frozen reference (dpo, ppo, grpo with beta > 0); empty: the policy run as it starts."""
    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    train: SftTrainConfig = field(default_factory=lambda: SftTrainConfig(lr=5e-6, batch_size=4, warmup_steps=0))
    peft: PeftConfig = field(default_factory=PeftConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Under torchrun: data parallelism only (parallel.dp; train.batch_size is per rank)."""
    resume: bool = False
    """Continue from the newest checkpoint of run.name (the same as --resume)."""

    def validate(self) -> None:
        check_layout(self.parallel)
        check(bool(self.policy), "policy is empty; name the run to align (policy=RUN)")
        for role in ("policy", "reference") + (("ppo.reward",) if self.method == "ppo" else ()):
            name = self.ppo.reward if role == "ppo.reward" else getattr(self, role)
            if role == "reference" and not name:
                continue
            if role == "ppo.reward" and not name:
                raise LmforgeError(
                    "method=ppo needs a reward model; give ppo.reward=RUN (a run trained with method=rm)"
                )
            path = resolve_run(name, self.run.root)
            if latest_checkpoint(path) is None:
                raise LmforgeError(f"{role} run {path} has no checkpoint; train it first")
            if path.resolve() == (Path(self.run.root) / self.run.name).resolve():
                raise LmforgeError(
                    f"run.name={self.run.name} is the {role} run itself; give the aligned run a new name"
                )
        if self.method == "grpo":
            check(
                bool(self.data.path) or bool(self.grpo.task),
                "method=grpo needs data.path=TASKS or grpo.task=arithmetic",
            )
        else:
            check(bool(self.data.path), f"method={self.method} needs data.path=FILE")
