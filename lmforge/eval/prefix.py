"""Scoring continuations that share a context in one forward pass: the context's tokens are computed once and each
continuation attends to them and to itself only (a tree of rows, as in SpecInfer's token-tree attention, Miao et al.,
2023), so a 4-way multiple-choice item costs its context once instead of four times. Tokens that every context of a
batch starts with (the few-shot examples) go further: they are prefilled once into a KV cache that every row attends
to, and kept for the next batch that starts with them too.

`SharedPrefix` answers attention.Cache's questions for such a batch, like models/packed.py: each continuation's tokens
take the positions right after its context, and its queries see the cached prefix, the context and its own earlier
tokens. Only the positions that predict a continuation token go through the final norm and the head.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models import KVCache
from lmforge.models.attention import ScoreBias

PAD = -1  # segment of padding; 0 is the context, j >= 1 the j-th continuation
MIN_SHARED = 16  # a shorter common prefix is not worth a prefill of its own


class SharedPrefix:
    """A cache for (B, T) rows of a context followed by its continuations, given each token's segment and position,
    after `past`: the keys and values of a prefix every row continues (per layer (1, Hkv, P, D)), or None."""

    def __init__(self, segments: Tensor, pos: Tensor, past: KVCache | None = None):
        self.pos, self.past = pos, past  # pos: (B, T), counted from the start of the prefix
        B, T = segments.shape
        P = 0 if past is None else past.pos
        flat = torch.arange(T, device=segments.device)
        seen = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])  # (B, Tq, Tk)
        allowed = seen & (flat[None, :] <= flat[:, None]) & (segments[:, None, :] != PAD)
        # a padding query sees itself only: a row of -inf alone would make SDPA return NaN
        allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
        allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool, device=segments.device), allowed], dim=2)
        self.allowed = allowed[:, None]  # (B, 1, T, P + T)
        self.key_pos = torch.cat([torch.arange(P, device=pos.device).expand(B, P), pos], dim=1)  # (B, P + T)

    def positions(self, T: int, device: torch.device) -> Tensor:
        return self.pos.to(device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """q: (B, H, T, D) over the prefix's keys and k, v: (B, Hkv, T, D) of the same rows -> (B, H, T, D)."""
        B = q.shape[0]
        if self.past is not None:
            P = self.past.pos
            k = torch.cat([self.past.k[layer, :, :, :P].expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
            v = torch.cat([self.past.v[layer, :, :, :P].expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
        mask = torch.zeros(self.allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~self.allowed, -torch.inf)
        S = int(self.key_pos.max()) + 1
        positional = bias.positional(torch.arange(S, device=q.device), S)  # (1, H, S, S) over true positions
        if positional is not None:  # ALiBi: the bias between the two tokens' own positions, not their flat distance
            per_row = positional[0][:, self.pos[:, :, None], self.key_pos[:, None, :]]  # (H, B, T, P + T)
            mask = mask + per_row.transpose(0, 1).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, T: int) -> None:
        pass


class PrefixScorer:
    """Scores batches of (context ids, [continuation ids, ...]): per continuation, the sum of its tokens'
    log-probabilities given the context and whether each of its tokens is the argmax (lm-eval's (logprob,
    is_greedy)). Contexts and continuations must be non-empty; one row per item, so the caller picks the batch."""

    def __init__(self, model):
        self.model = model
        self.prefix: tuple[tuple[int, ...], KVCache] | None = None  # the last shared prefix and its keys and values

    @torch.inference_mode()
    def score(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        n = _common_prefix([ctx for ctx, _ in items])
        n = min(n, min(len(ctx) for ctx, _ in items) - 1)  # every row keeps a token to predict its first one from
        cached = self.prefix[0] if self.prefix is not None else ()
        if len(cached) <= n <= len(cached) + max(MIN_SHARED, n // 8) and tuple(items[0][0][: len(cached)]) == cached:
            n = len(cached)  # the batch shares a little more than the cached prefix: not worth a new prefill
        past = self._prefill(items[0][0][:n]) if n >= MIN_SHARED else None
        P = 0 if past is None else past.pos
        rows, wheres = [], []
        for ctx, conts in items:
            ctx = ctx[P:]
            tokens, pos, seg, where = list(ctx), list(range(P, P + len(ctx))), [0] * len(ctx), []
            for j, cont in enumerate(conts, 1):
                start = len(tokens)
                tokens += cont[:-1]  # a continuation's last token is only predicted, never fed in
                pos += range(P + len(ctx), P + len(ctx) + len(cont) - 1)
                seg += [j] * (len(cont) - 1)
                where.append([len(ctx) - 1, *range(start, start + len(cont) - 1)])  # rows predicting cont's tokens
            rows.append((tokens, pos, seg))
            wheres.append(where)
        T = max(len(r[0]) for r in rows)
        model, device = self.model, self.model.lm_head.weight.device
        idx = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in rows], device=device)  # (B, T)
        pos = torch.tensor([r[1] + [0] * (T - len(r[1])) for r in rows], device=device)
        seg = torch.tensor([r[2] + [PAD] * (T - len(r[2])) for r in rows], device=device)
        h = model.hidden_states(idx, cache=SharedPrefix(seg, pos, past))  # (B, T, C)
        b_idx = [b for b, where in enumerate(wheres) for w in where for _ in w]
        t_idx = [t for where in wheres for w in where for t in w]
        targets = torch.tensor([t for _, conts in items for cont in conts for t in cont], device=device)  # (N,)
        logits = model.lm_head(model.norm(h[b_idx, t_idx])).float()  # (N, V)
        # log_softmax's value at the targets alone: no (N, V) tensor of log-probabilities is written
        token_lp = (logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)).tolist()
        greedy = (logits.argmax(dim=-1) == targets).tolist()
        out, i = [], 0
        for _, conts in items:
            scores = []
            for cont in conts:
                scores.append((sum(token_lp[i : i + len(cont)]), all(greedy[i : i + len(cont)])))
                i += len(cont)
            out.append(scores)
        return out

    def _prefill(self, tokens: list[int]) -> KVCache:
        if self.prefix is None or self.prefix[0] != tuple(tokens):
            weight = self.model.lm_head.weight
            cache = KVCache(self.model.cfg, 1, len(tokens), device=weight.device, dtype=weight.dtype)
            self.model.hidden_states(torch.tensor([tokens], device=weight.device), cache=cache)
            self.prefix = (tuple(tokens), cache)
        return self.prefix[1]


def batch_order(contexts: list[list[int]], batch_size: int, head: int = 32) -> list[int]:
    """Indices of `contexts` in the order to batch them: contexts that start with the same long prefix (few-shot
    examples) together, so a batch shares it, and longest first within it and among the rest, so rows pad little.

    Contexts whose first `head` tokens fill a batch form a group; each is keyed by the tokens it shares with the
    group's median context, cut to the length most of the group shares (a question that happens to begin like the
    median's stays with the others)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ctx in enumerate(contexts):
        groups.setdefault(tuple(ctx[:head]), []).append(i)
    prefix = {i: () for i in range(len(contexts))}
    for members in groups.values():
        if len(members) >= batch_size:
            ref = contexts[sorted(members, key=lambda i: contexts[i])[len(members) // 2]]
            shared = {i: _common_prefix([contexts[i], ref]) for i in members}
            most = Counter(shared.values()).most_common(1)[0][0]
            prefix.update({i: tuple(contexts[i][: min(shared[i], most)]) for i in members})
    count = Counter(prefix.values())
    # a prefix too few contexts share is no group: those contexts join the rest, not a batch of the group
    keys = {i: (0, p, -len(contexts[i])) if count[p] >= batch_size and p else (1, (), -len(contexts[i]))
            for i, p in prefix.items()}  # fmt: skip
    return sorted(range(len(contexts)), key=keys.__getitem__)


def _common_prefix(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def score_continuations(model, items: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
    """PrefixScorer(model).score(items), for one batch."""
    return PrefixScorer(model).score(items)
