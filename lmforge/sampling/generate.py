"""Streaming generation of one sequence with the model's own KV cache, for any stage: training samples, evaluation,
rollouts, and `lmforge generate` (which passes a faster decode step on the CPU, serve/generate.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models import Decoder, KVCache
from lmforge.sampling.params import seeded_generator
from lmforge.sampling.sample import sample_next
from lmforge.sampling.text import stream_text

# (model, its cache after the prompt) -> a function from the newest token to the logits after it, (1, V) or (V,)
DecodeStep = Callable[[Decoder, KVCache], Callable[[int], "Tensor"]]


def torch_step(model: Decoder, cache: KVCache) -> Callable[[int], Tensor]:
    """The model's own forward pass, one token at a time."""
    device = model.lm_head.weight.device
    return lambda token: model(torch.tensor([[token]], device=device), cache=cache)[:, -1]  # (1, V)


def generate_tokens(
    model: Decoder,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Iterable[int] = (),
    seed: int | None = None,
    step: DecodeStep = torch_step,
) -> Iterator[int]:
    """Stream up to max_new_tokens ids after the prompt (batch 1), stopping before a stop id or at the context end.
    The prompt goes through the model's forward pass; `step` runs the one-token steps after it."""
    context = model.cfg.max_seq_len
    if not prompt_ids or len(prompt_ids) >= context:
        raise LmforgeError(
            f"the prompt has {len(prompt_ids)} tokens and the context is {context}, which leaves no room to generate; "
            "give a non-empty prompt shorter than the context, or use fewer tokens of it"
        )
    if max_new_tokens < 0:
        raise LmforgeError(f"max_new_tokens={max_new_tokens} must be zero or positive")
    budget = min(max_new_tokens, context - len(prompt_ids))
    return _decode(model, prompt_ids, budget, temperature, top_k, top_p, frozenset(stop_ids), seed, step)


@torch.inference_mode()
def _decode(model, prompt_ids, budget, temperature, top_k, top_p, stop_ids, seed, step) -> Iterator[int]:
    if budget == 0:
        return
    weight = model.lm_head.weight
    generator = seeded_generator(seed, weight.device) if temperature > 0 else None
    # one cache for the whole stream, sized to what it will hold: no growth or copies per step
    cache = KVCache(model.cfg, 1, len(prompt_ids) + budget - 1, device=weight.device, dtype=weight.dtype)
    logits = model(torch.tensor([prompt_ids], device=weight.device), cache=cache, last_only=True)[:, -1]  # (1, V)
    decode_step = step(model, cache)
    greedy = temperature <= 0.0 or top_k == 1
    for i in range(budget):
        if greedy:  # argmax of a numpy step's logits: ~30 us a token less than a torch op on them
            token = int(logits.argmax())
        else:
            token = int(sample_next(torch.as_tensor(logits).view(1, -1), temperature, top_k, top_p, generator))
        if token in stop_ids:
            return
        yield token
        if i + 1 < budget:
            logits = decode_step(token)  # (1, V) tensor or (V,) numpy array


def generate(
    model: Decoder,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: Iterable[str] = (),
    seed: int | None = None,
    step: DecodeStep = torch_step,
) -> Iterator[str]:
    """Stream the continuation of `prompt` as text pieces, ending at EOS, at a stop string (not emitted) or the limit.

    Pieces are whole UTF-8 characters: bytes of a character split across tokens wait for the rest. Text that could
    be the start of a stop string is held back until it is clearly not one.
    """
    ids = generate_tokens(
        model, tokenizer.encode(prompt, bos=True), max_new_tokens, temperature, top_k, top_p, {tokenizer.eos_id}, seed,
        step,
    )  # fmt: skip
    return stream_text(ids, tokenizer, stop)
