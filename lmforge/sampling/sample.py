"""Choosing the next token: temperature, top-k and nucleus sampling (Holtzman et al., 2020), penalties and log-probs.

Numerically safe for every value SamplingParams.validate accepts: the logits are shifted by their maximum and divided
by the temperature in float64 (a temperature of 1e-320 is 0 in float32), and penalised logits are clamped to float32's
finite range, so no accepted setting turns the distribution into NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.sampling.params import SamplingParams

_FP32_MAX = torch.finfo(torch.float32).max


def sample_next(
    logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None = None
) -> Tensor:
    """logits: (B, V) -> next ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
    if temperature <= 0.0 or top_k == 1:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """(B, V) logits -> the (B, V) float32 distribution sample_next draws from (one-hot on the argmax when greedy)."""
    if temperature <= 0.0 or top_k == 1:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    # the largest logit becomes exactly 0 and every other one <= 0: a tiny temperature sends them to -inf, never NaN
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).float()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep a token while the mass before it is short of top_p: the smallest set reaching top_p, never empty
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop[:, 0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def penalized(logits: Tensor, tokens: list[int], prompt_len: int, p: SamplingParams) -> Tensor:
    """Apply repetition (over all `tokens`), presence and frequency penalties (over those after the prompt) to one
    row of logits (V,). Computed in float64 and clamped to float32's range: a penalty of 1e-320 gives the largest
    finite logit, not inf."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(tokens)), device=logits.device)
        scores = logits[seen].double()
        logits = logits.clone()
        scaled = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        logits[seen] = scaled.clamp(-_FP32_MAX, _FP32_MAX).to(logits.dtype)
    if (p.presence_penalty or p.frequency_penalty) and len(tokens) > prompt_len:
        ids, counts = torch.tensor(tokens[prompt_len:], device=logits.device).unique(return_counts=True)
        logits = logits.clone()
        shifted = logits[ids].double() - (p.presence_penalty + p.frequency_penalty * counts.double())
        logits[ids] = shifted.clamp(-_FP32_MAX, _FP32_MAX).to(logits.dtype)
    return logits


def logprob_entry(logprobs: Tensor, token: int, top: int | None) -> dict:
    """{"token", "logprob", "top": {id: logprob} of the `top` likeliest} from one row of log-probabilities (V,)."""
    best = torch.topk(logprobs, min(top, len(logprobs))) if top else None
    alternatives = {} if best is None else dict(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return {"token": token, "logprob": float(logprobs[token]), "top": alternatives}
