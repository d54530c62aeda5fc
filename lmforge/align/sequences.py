"""Prompt-and-reply sequences as every alignment method sees them: a reply encoded after its chat prompt, batches of
them right-padded, and the per-token log-probabilities of the reply tokens under a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.finetune.formats import Conversation
from lmforge.finetune.tuned import Tuned


def encode_reply(tokenizer, prompt: Conversation, reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids ending in the generation prompt, the reply's ids with the template's end of turn). The prompt's
    encoding must be a prefix of the whole conversation's, as for SFT's loss masks."""
    prompt_ids = tokenizer.encode_chat(prompt, add_generation_prompt=True, bos=True)
    ids = tokenizer.encode_chat([*prompt, {"role": "assistant", "content": reply}], bos=True)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise LmforgeError(
            "the chat template does not render a prompt as a prefix of its answered conversation; use a template "
            "that renders turns left to right"
        )
    return prompt_ids, ids[len(prompt_ids) :]


@dataclass
class SequenceBatch:
    """B prompt-and-reply sequences, right-padded: inputs x (B, T-1), next-token targets y (B, T-1), and the mask
    (B, T-1) of the targets that are reply tokens (the only ones scored)."""

    x: Tensor
    y: Tensor
    mask: Tensor

    def to(self, device) -> SequenceBatch:
        return SequenceBatch(self.x.to(device), self.y.to(device), self.mask.to(device))

    @property
    def lengths(self) -> Tensor:
        """(B,) reply tokens per sequence."""
        return self.mask.sum(-1)


def make_batch(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> SequenceBatch:
    if len(prompts) != len(replies) or not prompts:
        raise ValueError("make_batch needs as many prompts as replies, at least one")
    rows = [p + r for p, r in zip(prompts, replies, strict=True)]
    width = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    scored = torch.zeros((B, width), dtype=torch.bool)
    for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        ids[i, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        scored[i, len(prompt) : len(prompt) + len(reply)] = True
    return SequenceBatch(ids[:, :-1], ids[:, 1:].clone(), scored[:, 1:])


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per position from logits (B, T, V): the gathered logit minus the logsumexp, in float32 at least
    (without materialising the whole log-softmax)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def reply_logprobs(model, batch: SequenceBatch) -> Tensor:
    """(B, T-1) log-probabilities of the reply tokens under `model` (a Decoder or a finetune Tuned), 0 elsewhere.
    Sum over the last axis for a sequence's log-probability. Where the method leaves the forward pass to the decoder,
    the LM head runs on reply positions only: a prompt position's logits (49k numbers each for SmolLM2) are never
    made."""
    decoder = model.model if isinstance(model, Tuned) else model
    if not isinstance(model, Tuned) or type(model).logits is Tuned.logits:
        hidden = decoder.hidden_states(batch.x)  # (B, T-1, C)
        picked = token_logprobs(decoder.lm_head(decoder.norm(hidden[batch.mask])), batch.y[batch.mask])  # (N,)
        return torch.zeros(batch.mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(
            batch.mask, picked
        )
    return token_logprobs(model.logits(batch.x), batch.y) * batch.mask  # soft prompts and prefixes: the whole pass


@torch.no_grad()
def reply_logprobs_in_batches(model, batches: list[SequenceBatch], device) -> list[Tensor]:
    """reply_logprobs of each batch without gradients, on the CPU afterwards (a frozen reference's, computed once)."""
    was_training = model.training
    model.eval()
    out = [reply_logprobs(model, b.to(device)).cpu() for b in batches]
    model.train(was_training)
    return out
