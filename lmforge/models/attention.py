"""Multi-head attention (MHA/GQA/MQA; Vaswani et al., 2017) and the cache protocol it attends through.

Whether attention is causal or bidirectional, and whether it reads its own tokens or a memory (cross attention, as an
encoder-decoder's decoder does), is chosen once in `Attention.__init__`; `forward` branches only on whether a cache is
used. Any cache that answers `Cache`'s three questions works: kv_cache.KVCache (contiguous, for generation) and
kv_cache.PagedBatch (one step of the serving engine over its block pool) are the two there are.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.config import ModelConfig
from lmforge.models.layers import Positions


def causal_mask(q_pos: Tensor, k_len: int) -> Tensor:
    """(1, 1, Tq, k_len): 0 where the key at position [0, k_len) is at or before the query's position, else -inf."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = torch.zeros(len(q_pos), k_len, device=q_pos.device)
    return mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))[None, None]


class ScoreBias(NamedTuple):
    """What attention adds to its scores for queries at `q_pos` over keys at positions [0, k_len): the positional
    scheme's bias (None for cross attention: the memory carries its own positions) and, when causal, -inf on every key
    after its query. Hashable, so a cache can compute it once for all layers of a step."""

    positions: Positions | None
    causal: bool

    def positional(self, q_pos: Tensor, k_len: int) -> Tensor | None:
        return None if self.positions is None else self.positions.bias(q_pos, k_len)

    def add_causal(self, bias: Tensor | None, q_pos: Tensor, k_len: int) -> Tensor | None:
        if not self.causal:
            return bias
        mask = causal_mask(q_pos, k_len)
        return mask if bias is None else bias + mask

    def __call__(self, q_pos: Tensor, k_len: int) -> Tensor | None:
        """The whole additive bias (1, 1|H, Tq, k_len), or None where nothing is added."""
        return self.add_causal(self.positional(q_pos, k_len), q_pos, k_len)


@runtime_checkable
class Cache(Protocol):
    """What attention asks of a KV cache: where the new tokens are, and attention of their queries over everything
    their sequences hold."""

    def positions(self, T: int, device: torch.device) -> Tensor:
        """Absolute positions (T,) of the T new tokens (the model's input is (B, T))."""
        ...

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """Store the new tokens' k, v: (B, Hkv, T, D) of `layer`; return q: (B, H, T, D) attended over all keys of its
        sequence, the new ones included, with `bias` on the scores: (B, H, T, D)."""
        ...

    def advance(self, T: int) -> None:
        """Called once after every layer has attended: the T new tokens now belong to the cache."""
        ...


def attend(q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias, q_pos: Tensor, dropout: float = 0.0) -> Tensor:
    """q: (B, H, T, D) at q_pos over k, v: (B, Hkv, S, D) at positions [0, S), without a cache -> (B, H, T, D)."""
    gqa = q.shape[1] != k.shape[1]
    positional = bias.positional(q_pos, k.shape[2])
    if positional is None:  # no mask tensor: SDPA's own causal flag keeps its fused kernels (flash on a GPU)
        return F.scaled_dot_product_attention(q, k, v, is_causal=bias.causal, dropout_p=dropout, enable_gqa=gqa)
    mask = bias.add_causal(positional, q_pos, k.shape[2]).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


class Attention(nn.Module):
    """Causal or bidirectional attention over a sequence's own tokens, or with `cross` over a memory (B, S, C).

    `inputs`, picked here, makes the queries, keys, values and score bias of either kind, so forward never asks which
    kind it is. A cache given to cross attention receives the memory's keys and values: it must be one made for them.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0, causal: bool = True, cross: bool = False):
        super().__init__()
        if cross and causal:
            raise ValueError("cross attention sees its whole memory: build it with causal=False")
        self.layer, self.causal = layer, causal
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.dim, q_dim, bias=cfg.bias)
            self.kv = nn.Linear(cfg.dim, 2 * kv_dim, bias=cfg.bias)
            self.inputs = self._over_memory
        else:
            # one fused projection for q, k and v: a single larger matmul is faster than three on a CPU
            self.qkv = nn.Linear(cfg.dim, q_dim + 2 * kv_dim, bias=cfg.bias)
            self.inputs = self._over_self
        self.proj = nn.Linear(q_dim, cfg.dim, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(
        self, x: Tensor, positions: Positions, pos: Tensor, cache: Cache | None = None, memory: Tensor | None = None
    ) -> Tensor:
        """x: (B, T, C) at positions pos (T,) -> (B, T, C). With a cache, the new keys and values go into it and the
        queries attend over all it holds; cross attention reads `memory` (B, S, C), an encoder's output."""
        B, T, C = x.shape
        q, k, v, bias = self.inputs(x, memory, positions, pos)  # q: (B, H, T, D); k, v: (B, Hkv, S, D)
        if cache is None:
            y = attend(q, k, v, bias, pos, self.dropout if self.training else 0.0)
        else:
            y = cache.attend(self.layer, q, k, v, bias)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D): C, or C / tp when heads are split over ranks
        return self.proj(y)

    def _over_self(self, x: Tensor, memory: None, positions: Positions, pos: Tensor):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)  # (B, H*, T, D)
        q, k = positions.rotate(q, k, pos)
        return q, k, v, ScoreBias(positions, self.causal)

    def _over_memory(self, x: Tensor, memory: Tensor, positions: Positions, pos: Tensor):
        (B, T, _), S = x.shape, memory.shape[1]
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        kv = self.kv(memory).view(B, S, 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        k, v = kv.split([self.n_kv_heads, self.n_kv_heads], dim=1)  # (B, Hkv, S, D)
        return q, k, v, ScoreBias(None, causal=False)  # no rotation or bias: positions live in x and the memory
