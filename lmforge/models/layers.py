"""Shared layers: norms, feed-forward blocks and positional schemes (absolute learned/sinusoidal, RoPE, ALiBi).

Each positional scheme answers the same three questions so attention never branches on which one it is:
what to add to the token embeddings, how to rotate queries and keys, and what bias to add to the scores.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.config import ModelConfig


def layernorm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


def rmsnorm(cfg: ModelConfig) -> nn.Module:
    return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)


NORMS = {"layernorm": layernorm, "rmsnorm": rmsnorm}


class GeluMLP(nn.Module):
    """GPT-2 feed-forward: up, GELU, down (Hendrycks & Gimpel, 2016); approximate="tanh" is the fit OpenAI's GPT-2
    was trained with (transformers' "gelu_new")."""

    def __init__(self, cfg: ModelConfig, approximate: str = "none"):
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """LLaMA feed-forward: down(silu(gate(x)) * up(x)) (Shazeer, 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # gate and up fused into one matmul: rows [0, hidden) are the gate, [hidden, 2*hidden) the up projection
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


MLPS = {"gelu": GeluMLP, "gelu_tanh": functools.partial(GeluMLP, approximate="tanh"), "swiglu": SwiGLU}


class Positions(nn.Module):
    """No positional information of its own; the base for the schemes below."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    def init_weights(self) -> None:
        pass

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: (B, T, C) token embeddings; pos: (T,) absolute positions, or (B, T) per row (models/packed.py)."""
        return x

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """q: (B, Hq, T, D), k: (B, Hkv, T, D)."""
        return q, k

    def bias(self, q_pos: Tensor, k_len: int) -> Tensor | None:
        """Additive score bias (1, H, Tq, k_len) for queries at q_pos over keys at positions [0, k_len), or None."""
        return None


class LearnedPositions(Positions):
    """A trained vector per position (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)

    def init_weights(self) -> None:
        nn.init.normal_(self.wpe.weight, std=self.cfg.init_std)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.wpe(pos)


class SinusoidalPositions(Positions):
    """Fixed sines and cosines of geometric frequencies (Vaswani et al., 2017)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("table", torch.empty(cfg.max_seq_len, cfg.dim), persistent=False)

    def init_weights(self) -> None:
        T, C = self.cfg.max_seq_len, self.cfg.dim
        pos = torch.arange(T, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, C, 2, dtype=torch.float32) * (-math.log(10000.0) / C))
        table = torch.zeros(T, C, device=self.table.device)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: C // 2])
        self.table.copy_(table)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.table[pos].to(x.dtype)


class RotaryPositions(Positions):
    """RoPE (Su et al., 2021), in the half-split layout that HF LLaMA checkpoints use."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)

    def init_weights(self) -> None:
        D = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        angles = torch.outer(torch.arange(self.cfg.max_seq_len, dtype=torch.float32), inv_freq)  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.cos[pos].to(q.dtype), self.sin[pos].to(q.dtype)  # (T, D), or (B, T, D) for packed rows
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): one table per row, shared by its heads
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class ALiBiPositions(Positions):
    """ALiBi (Press et al., 2022): a per-head linear penalty on distance, added to the scores. Symmetric in the
    distance, so bidirectional attention gets it too (as MosaicBERT does); causal attention masks the future on top."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.register_buffer("slopes", torch.empty(cfg.n_heads), persistent=False)

    def init_weights(self) -> None:
        self.slopes.copy_(alibi_slopes(self.cfg.n_heads))

    def bias(self, q_pos: Tensor, k_len: int) -> Tensor:
        k_pos = torch.arange(k_len, device=q_pos.device)
        distance = (k_pos[None, :] - q_pos[:, None]).abs().float()  # (Tq, Tk)
        return (-self.slopes[:, None, None] * distance)[None]  # (1, H, Tq, Tk)


def alibi_slopes(n_heads: int) -> Tensor:
    """Geometric slopes 2^(-8i/n); for a head count that is not a power of two, interleave as the paper does."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


POSITIONS = {
    "learned": LearnedPositions,
    "sinusoidal": SinusoidalPositions,
    "rope": RotaryPositions,
    "alibi": ALiBiPositions,
}
