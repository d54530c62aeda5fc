"""Packed rows: several examples laid end to end in one training row, each attending only to itself.

`PackedRows` answers attention.Cache's questions for such a batch without storing anything: each token's position
counts from the start of its own example (so RoPE and learned positions see every example as if it stood alone), and
a query attends to the keys of its own example at or before it. Passed as the model's `cache`, it makes an example's
logits independent of its neighbours (tests/models/test_packed.py), which is what packing needs to be exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.attention import ScoreBias


def segment_positions(segments: Tensor) -> Tensor:
    """segments: (B, T) example ids, equal within an example and changing where the next one starts ->
    (B, T) positions counted from each example's first token."""
    B, T = segments.shape
    idx = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # (B, T) index of each example's start
    return idx - first


class PackedRows:
    """A stateless cache for a (B, T) batch of packed rows, given the example id of every token."""

    def __init__(self, segments: Tensor):
        self.segments = segments
        self.pos = segment_positions(segments)  # (B, T)
        T = segments.shape[1]
        flat = torch.arange(T, device=segments.device)
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        self.allowed = (same & (flat[None, :] <= flat[:, None]))[:, None]  # (B, 1, Tq, Tk)

    def positions(self, T: int, device: torch.device) -> Tensor:
        assert self.pos.shape[1] == T, "PackedRows describes one whole batch; it does not continue sequences"
        return self.pos.to(device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """q: (B, H, T, D) over k, v: (B, Hkv, T, D) of the same rows -> (B, H, T, D)."""
        T = q.shape[2]
        # within one example, flat distance equals position distance, so ALiBi's bias over flat positions is exact
        positional = bias.positional(torch.arange(T, device=q.device), T)
        mask = torch.zeros(self.allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~self.allowed, -torch.inf)
        if positional is not None:
            mask = mask + positional.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, T: int) -> None:
        pass
