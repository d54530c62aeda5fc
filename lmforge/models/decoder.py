"""Decoder-only transformer (GPT-2 and LLaMA families): causal self-attention with MHA/GQA/MQA, through a KV cache
when one is given (attention.Cache).

Variants (positions, norm, MLP) are picked once in __init__; forward branches only on whether a KV cache is used.
Init (`init_weights`): N(0, init_std) for embeddings and linear weights, zero biases, and the two residual
projections of each block scaled by 1/sqrt(2 * n_layers) so the residual stream's variance stays flat with
depth (GPT-2, Radford et al., 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.attention import Attention, Cache
from lmforge.models.config import ModelConfig
from lmforge.models.layers import MLPS, NORMS, POSITIONS, Positions


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = NORMS[cfg.norm](cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = NORMS[cfg.norm](cfg)
        self.mlp = MLPS[cfg.mlp](cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, positions: Positions, pos: Tensor, cache: Cache | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), positions, pos, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Decoder(nn.Module):
    """Token embedding -> positions -> n_layers blocks -> final norm -> lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positions = POSITIONS[cfg.pos](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = NORMS[cfg.norm](cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (also after building on the meta device)."""
        std = self.cfg.init_std
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scaled = name.endswith(("attn.proj", "mlp.down"))
                nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.cfg.n_layers) if scaled else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding | nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()
                if isinstance(module, nn.Embedding):
                    nn.init.normal_(module.weight, std=std)
        self.positions.init_weights()

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: Cache | None = None,
        last_only: bool = False,
        prompt: Tensor | None = None,
    ) -> Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, V), or (B, 1, V) of the last position with last_only, or the
        mean cross-entropy when targets (B, T) are given (positions with target -100 are ignored). With a cache,
        idx continues the cached sequences. `prompt` (B, P, C): embeddings that stand before idx's tokens (a soft
        prompt, Lester et al., 2021); they take positions [0, P) and get no logits of their own."""
        B, T = idx.shape
        x = self.hidden_states(idx, cache, prompt)  # (B, T, C)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): a prefill needs only the next token's logits, not a (B, T, V) tensor
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T), ignore_index=-100)

    def hidden_states(self, idx: Tensor, cache: Cache | None = None, prompt: Tensor | None = None) -> Tensor:
        """idx: (B, T) -> the last block's output (B, T, C), before the final norm and the head; a soft `prompt`
        (B, P, C) runs in front of the tokens and is cut from the output."""
        x = self.embed(idx)  # (B, T, C)
        P = 0 if prompt is None else prompt.shape[1]
        if P:
            x = torch.cat([prompt.to(x.dtype), x], dim=1)  # (B, P + T, C)
        T = x.shape[1]
        pos = torch.arange(T, device=idx.device) if cache is None else cache.positions(T, idx.device)
        x = self.drop(self.positions.embed(x, pos))
        for block in self.layers:
            x = block(x, self.positions, pos, cache)
        if cache is not None:
            cache.advance(T)
        return x[:, P:]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> Decoder:
    """Build on the meta device (no memory touched), materialise on `device`, initialise once."""
    with torch.device("meta"):
        model = Decoder(cfg)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model
