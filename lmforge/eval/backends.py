"""What an evaluation asks of a model, answered by a run folder in-process (`Local`) or by an OpenAI-compatible server
(`Endpoint`): log-likelihoods of continuations, the log-likelihood of a whole text, and generations.

Contexts and continuations are split into tokens as lm-eval 0.4 does (a context's trailing whitespace moves to the
continuation; the continuation's tokens are those of context + continuation after the context's own), so scores match
lm-eval's `hf` model item by item. A context longer than the model leaves is left-truncated, as lm-eval does, and
counted; a continuation that alone fills the context is skipped with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmforge.eval.prefix import PrefixScorer, batch_order
from lmforge.sampling import generate_tokens, stream_text

Scores = list[tuple[float, bool]]  # per continuation: (log-likelihood, is greedy)
TOO_LONG = "continuation longer than the model's context"


def split_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx) :]


class Local:
    """A model and tokenizer in this process. `bos` puts the tokenizer's BOS before every context: lmforge trains
    with it, and lm-eval's `hf` model on our transformers export adds it too (the exported tokenizer does)."""

    def __init__(self, model, tokenizer, batch_size: int = 8, bos: bool = True):
        self.model, self.tokenizer, self.batch_size, self.bos = model, tokenizer, batch_size, bos
        self.max_len = model.cfg.max_seq_len
        self.truncated = 0
        self.scorer = PrefixScorer(model)

    def prepare(self, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]] | str:
        """Token ids (context, continuations) cut to the model's context, or the reason the item cannot be scored."""
        if context:
            pairs = [split_pair(self.tokenizer.encode, context, c) for c in continuations]
            ctx, conts = pairs[0][0], [cont for _, cont in pairs]
        else:
            ctx, conts = [], [self.tokenizer.encode(c) for c in continuations]
        if self.bos or not ctx:
            ctx = [self.tokenizer.bos_id, *ctx]
        if not all(conts):
            return "empty continuation"
        room = self.max_len + 1 - max(len(c) for c in conts)  # lm-eval keeps the last max_len + 1 tokens
        if room < 1:
            return TOO_LONG
        if len(ctx) > room:
            ctx, self.truncated = ctx[-room:], self.truncated + 1
        return ctx, conts

    def loglikelihood(self, requests: list[tuple[str, list[str]]]) -> list[Scores | str]:
        """For each (context, continuations): their scores, or the reason the item was skipped."""
        prepared = [self.prepare(ctx, conts) for ctx, conts in requests]
        out: list[Scores | str] = [p if isinstance(p, str) else [] for p in prepared]
        todo = [i for i, p in enumerate(prepared) if not isinstance(p, str)]
        todo = [todo[k] for k in batch_order([prepared[i][0] for i in todo], self.batch_size)]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for i, scores in zip(chunk, self.scorer.score([prepared[i] for i in chunk]), strict=True):
                out[i] = scores
        return out

    @torch.inference_mode()
    def rolling_nll(self, text: str, stride: int = 0) -> tuple[float, int]:
        """(negative log-likelihood in nats, tokens scored) of the whole text after a BOS, in windows of the model's
        context whose ends advance by `stride` tokens (0: half the context; the context: lm-eval's disjoint windows),
        each token scored once with as much context as its window holds."""
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
        W = self.max_len
        S = min(stride or max(1, W // 2), W)
        device = self.model.lm_head.weight.device
        nll, scored = 0.0, 1  # ids[scored] is the next token to score
        while scored < len(ids):
            end = min(len(ids), max(scored + S, W + 1))  # this window scores ids[scored:end]
            begin = max(0, end - 1 - W)  # from W inputs ids[begin:end - 1]; row t predicts ids[begin + t + 1]
            logprobs = torch.log_softmax(self.model(torch.tensor([ids[begin : end - 1]], device=device))[0].float(), -1)
            targets = torch.tensor(ids[scored:end], device=device)
            nll -= float(logprobs[scored - begin - 1 :].gather(1, targets[:, None]).sum())
            scored = end
        return nll, len(ids) - 1

    def generate(
        self, prompts: list[str], until: list[str], max_tokens: int, n: int = 1, temperature: float = 0.0, seed=0
    ) -> list[list[str] | str]:
        """n completions of each prompt (after a BOS), ending at EOS or the first stop string (not included); a
        prompt longer than the context keeps its last tokens, as lm-eval does."""
        out: list[list[str] | str] = []
        for p, prompt in enumerate(prompts):
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
            room = self.max_len - min(max_tokens, self.max_len // 2)
            if len(ids) > room:
                ids, self.truncated = ids[-room:], self.truncated + 1
            completions = []
            for k in range(n):
                stream = generate_tokens(
                    self.model, ids, max_tokens, temperature, stop_ids={self.tokenizer.eos_id}, seed=seed + p * n + k
                )
                completions.append("".join(stream_text(stream, self.tokenizer, until)))
            out.append(completions)
        return out


def _size(prepared: tuple[list[int], list[list[int]]]) -> int:
    ctx, conts = prepared
    return len(ctx) + sum(len(c) for c in conts)


def bits_per_byte(nll: float, n_bytes: int) -> float:
    return nll / (math.log(2) * n_bytes)
