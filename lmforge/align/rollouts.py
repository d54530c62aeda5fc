"""Replies sampled from the policy as it is now, through lmforge's batching engine (serve/engine.py): every prompt's
group goes in as one batch of requests, so rollouts run with continuous batching, the paged KV cache, shared-prefix
caching and (for an fp32 model on the CPU) the C kernels, not a Python loop of single sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.models import Decoder
from lmforge.sampling import SamplingParams
from lmforge.serve.engine import Engine, EngineConfig


@dataclass
class Rollout:
    prompt: list[int]
    reply: list[int]
    """The sampled tokens, the end-of-turn token included when the reply ended by itself."""
    text: str
    """The reply decoded, without the end-of-turn token."""
    finished: bool
    """The reply ended with an end-of-turn or end-of-text token (not at max_new_tokens)."""


def sample_groups(
    model: Decoder,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[Rollout]]:
    """`group_size` replies to each prompt, sampled by `model` with its current weights (the engine is built per
    call: the CPU runner keeps packed copies of the weights, which an optimizer step leaves stale). Request i of the
    call samples with seed + i, so a resumed run draws the same replies. The model's train/eval mode is kept."""
    was_training = model.training
    stops = sorted({t for t in (tokenizer.eos_id, tokenizer.end_of_turn_id) if t is not None})
    end = tokenizer.end_of_turn_id if tokenizer.end_of_turn_id is not None else tokenizer.eos_id
    block_size = 16
    longest = max(len(p) for p in prompts) + max_new_tokens
    n = len(prompts) * group_size
    cfg = EngineConfig(
        max_num_seqs=n,
        kv_blocks=n * math.ceil(min(longest, model.cfg.max_seq_len) / block_size),
        block_size=block_size,
        max_batched_tokens=max(512, min(4096, sum(len(p) for p in prompts) * group_size)),
        max_waiting=n,
    )
    engine = Engine(model, tokenizer, cfg)
    requests = [p for p in prompts for _ in range(group_size)]
    params = [
        SamplingParams(
            max_tokens=min(max_new_tokens, model.cfg.max_seq_len - len(p)),
            temperature=temperature,
            top_p=top_p,
            seed=seed + i,
            stop_token_ids=stops,
        )
        for i, p in enumerate(requests)
    ]
    outputs = engine.generate_each(requests, params)
    model.train(was_training)
    groups: list[list[Rollout]] = []
    for i, (prompt, out) in enumerate(zip(requests, outputs, strict=True)):
        if i % group_size == 0:
            groups.append([])
        ended = out.finish_reason == "stop"  # the engine leaves the stop token out of token_ids
        reply = list(out.token_ids) + ([end] if ended else [])
        groups[-1].append(Rollout(prompt, reply, tokenizer.decode(out.token_ids), ended))
    return groups
