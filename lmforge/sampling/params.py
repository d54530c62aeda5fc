"""The sampling parameters of a request and their one validation, shared by the engine, the server and the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError


class SamplingError(LmforgeError):
    """A sampling parameter out of its range; `param` names it (the server's 400 names it too)."""

    def __init__(self, param: str, value, rule: str):
        super().__init__(f"{param}={value!r} {rule}")
        self.param, self.value, self.rule = param, value, rule


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy. Any finite value >= 0 is safe (sample.sampling_probs)."""
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    """CTRL's penalty (Keskar et al., 2019): logits of tokens already in the prompt or output divided by it
    (multiplied when negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's definition)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per time it was generated."""
    seed: int | None = None
    """Any integer; torch seeds with 64 bits, so it is taken modulo 2**64 (see seeded_generator)."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many top alternatives (None: off)."""
    prompt_logprobs: bool = False
    """Return every prompt token's log-probability (turns prefix caching off for the request)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    def validate(self) -> None:
        """SamplingError naming the first parameter out of range."""
        _integer("max_tokens", self.max_tokens, ">= 0", minimum=0)
        _finite("temperature", self.temperature, ">= 0 (0 is greedy)", lambda t: t >= 0)
        _integer("top_k", self.top_k, ">= 0 (0 switches it off)", minimum=0)
        _finite("top_p", self.top_p, "in (0, 1] (1 switches it off)", lambda p: 0 < p <= 1)
        _finite("repetition_penalty", self.repetition_penalty, "> 0 (1 switches it off)", lambda r: r > 0)
        # any finite value is safe (sample.penalized clamps the logits); OpenAI documents [-2, 2], and larger values
        # are a user's way to forbid repeats outright
        _finite("presence_penalty", self.presence_penalty, "(0 switches it off)", lambda _: True)
        _finite("frequency_penalty", self.frequency_penalty, "(0 switches it off)", lambda _: True)
        if self.seed is not None:
            _integer("seed", self.seed, "(any integer)")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, ">= 0", minimum=0)
        if not all(isinstance(s, str) for s in self.stop):
            raise SamplingError("stop", self.stop, "must be a list of strings")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise SamplingError("stop_token_ids", self.stop_token_ids, "must be a list of integers")


def _integer(param: str, value, rule: str, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise SamplingError(param, value, f"must be an integer {rule}")


def _finite(param: str, value, rule: str, holds) -> None:
    try:  # math.isfinite raises OverflowError on an integer beyond float's range
        ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and holds(value)
    except OverflowError:
        ok = False
    if not ok:
        raise SamplingError(param, value, f"must be a finite number {rule}")


def seeded_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` modulo 2**64 (torch's seed is 64 bits; any Python integer works), or None."""
    return None if seed is None else torch.Generator(device).manual_seed(seed % 2**64)
