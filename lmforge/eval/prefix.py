"""Scoring continuations that share a context in one forward pass: the context's tokens are computed once and each
continuation attends to them and to itself only (a tree of rows, as in SpecInfer's token-tree attention, Miao et al.,
2023), so a 4-way multiple-choice item costs its context once instead of four times.

`SharedPrefix` answers attention.Cache's questions for such a batch without storing anything, like models/packed.py:
each continuation's tokens take the positions right after the context, and its queries see the context and its own
earlier tokens. One forward pass scores a whole batch of items (one item a row, right-padded); only the positions that
predict a continuation token go through the final norm and the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.attention import ScoreBias

PAD = -1  # segment of padding; 0 is the context, j >= 1 the j-th continuation


class SharedPrefix:
    """A stateless cache for (B, T) rows of a context followed by its continuations, given each token's segment and
    position."""

    def __init__(self, segments: Tensor, pos: Tensor):
        self.pos = pos  # (B, T)
        T = segments.shape[1]
        flat = torch.arange(T, device=segments.device)
        seen = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])  # (B, Tq, Tk)
        allowed = seen & (flat[None, :] <= flat[:, None]) & (segments[:, None, :] != PAD)
        # a padding query sees itself only: a row of -inf alone would make SDPA return NaN
        self.allowed = (allowed | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]  # (B, 1, Tq, Tk)

    def positions(self, T: int, device: torch.device) -> Tensor:
        return self.pos.to(device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """q: (B, H, T, D) over k, v: (B, Hkv, T, D) of the same rows -> (B, H, T, D)."""
        mask = torch.zeros(self.allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~self.allowed, -torch.inf)
        P = int(self.pos.max()) + 1
        positional = bias.positional(torch.arange(P, device=q.device), P)  # (1, H, P, P) over true positions
        if positional is not None:  # ALiBi: the bias between the two tokens' own positions, not their flat distance
            per_row = positional[0][:, self.pos[:, :, None], self.pos[:, None, :]]  # (H, B, T, T)
            mask = mask + per_row.transpose(0, 1).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, T: int) -> None:
        pass


@torch.inference_mode()
def score_continuations(model, items: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids, ...]): per continuation, the sum of its tokens' log-probabilities
    given the context, and whether each of its tokens is the argmax (lm-eval's (logprob, is_greedy)). Contexts and
    continuations must be non-empty; one row per item, so the caller chooses the batch."""
    rows, wheres = [], []
    for ctx, conts in items:
        tokens, pos, seg, where = list(ctx), list(range(len(ctx))), [0] * len(ctx), []
        for j, cont in enumerate(conts, 1):
            start = len(tokens)
            # a continuation's last token is only predicted, never fed in
            tokens += cont[:-1]
            pos += range(len(ctx), len(ctx) + len(cont) - 1)
            seg += [j] * (len(cont) - 1)
            where.append([len(ctx) - 1, *range(start, start + len(cont) - 1)])  # positions predicting cont's tokens
        rows.append((tokens, pos, seg))
        wheres.append(where)
    T = max(len(r[0]) for r in rows)
    device = model.lm_head.weight.device
    idx = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in rows], device=device)  # (B, T)
    pos = torch.tensor([r[1] + [0] * (T - len(r[1])) for r in rows], device=device)
    seg = torch.tensor([r[2] + [PAD] * (T - len(r[2])) for r in rows], device=device)
    h = model.hidden_states(idx, cache=SharedPrefix(seg, pos))  # (B, T, C)
    b_idx = [b for b, where in enumerate(wheres) for w in where for _ in w]
    t_idx = [t for where in wheres for w in where for t in w]
    targets = torch.tensor([t for _, conts in items for cont in conts for t in cont], device=device)  # (N,)
    logprobs = torch.log_softmax(model.lm_head(model.norm(h[b_idx, t_idx])).float(), dim=-1)  # (N, V)
    token_lp = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    greedy = (logprobs.argmax(dim=-1) == targets).tolist()
    out, n = [], 0
    for _, conts in items:
        scores = []
        for cont in conts:
            scores.append((sum(token_lp[n : n + len(cont)]), all(greedy[n : n + len(cont)])))
            n += len(cont)
        out.append(scores)
    return out
