"""Virtual tokens in front of the input: prompt tuning (Lester et al., 2021), P-tuning's prompt encoder (Liu et al.,
2021) and prefix tuning's trained keys and values in every layer (Li & Liang, 2021), laid out as peft lays them so
weights move between the two (tests/finetune/test_peft_parity.py).

As in transformers with peft, the P virtual tokens take positions [0, P) and the real tokens P, P + 1, ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.finetune.tuned import Tuned
from lmforge.models import Decoder
from lmforge.models.attention import ScoreBias
from lmforge.models.packed import segment_positions

if TYPE_CHECKING:
    from lmforge.finetune.methods import PeftConfig


class VirtualTokens:
    """attention.Cache for a batch behind P virtual tokens, which every real token sees: either P soft-prompt rows
    that stand first in the input, or (`prefix`: per layer (k, v), each (B, Hkv, P, D)) P trained keys and values
    before each layer's own. With `segments` (B, T) the rows are packed: each example sees the virtual tokens and
    itself, its positions counted from P. (ALiBi's distances to the virtual tokens are then flat distances.)"""

    def __init__(self, P: int, segments: Tensor | None = None, prefix: list[tuple[Tensor, Tensor]] | None = None):
        self.P, self.segments, self.prefix = P, segments, prefix

    def positions(self, T: int, device: torch.device) -> Tensor:
        P, first = self.P, 0 if self.prefix else self.P  # prompt rows hold their own positions [0, P)
        if self.segments is None:
            return torch.arange(P - first, P - first + T, device=device)
        pos = P + segment_positions(self.segments).to(device)  # (B, T - first)
        virtual = torch.arange(first, device=device).expand(pos.shape[0], first)
        return torch.cat([virtual, pos], dim=1)  # (B, T)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """q: (B, H, Tq, D); k, v: (B, Hkv, Tq, D) -> (B, H, Tq, D) over the virtual keys and the rows' own."""
        if self.prefix:
            pk, pv = self.prefix[layer]
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)  # (B, Hkv, S, D)
        Tq, S = q.shape[2], k.shape[2]
        q_flat = torch.arange(S - Tq, S, device=q.device)  # the queries' places among the S keys
        if self.segments is None:  # flat places are the positions: the usual causal mask and positional bias
            mask = bias(q_flat, S)
        else:
            seg = self.segments.to(q.device)
            virtual = seg.min() - 1
            seg_k = torch.cat([torch.full((seg.shape[0], self.P), virtual, device=q.device, dtype=seg.dtype), seg], 1)
            seg_q = seg_k[:, S - Tq :]
            allowed = (seg_k[:, None, :] == seg_q[:, :, None]) | (seg_k[:, None, :] == virtual)  # (B, Tq, S)
            allowed &= torch.arange(S, device=q.device)[None, None, :] <= q_flat[None, :, None]
            mask = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, -torch.inf)[:, None]
            positional = bias.positional(q_flat, S)
            mask = mask if positional is None else mask + positional
        mask = None if mask is None else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, T: int) -> None:
        pass


def _check_fits(model: Decoder, P: int, T: int) -> None:
    if model.cfg.max_seq_len < P + T:
        raise LmforgeError(
            f"{P} virtual tokens + {T} tokens exceed model.max_seq_len={model.cfg.max_seq_len}: the real tokens take "
            "positions after the virtual ones; shorten the rows or use fewer peft.virtual_tokens"
        )


class SoftPromptTuned(Tuned):
    """Prompt tuning and P-tuning: `prompt()` (P, C) embeddings stand before every row's tokens."""

    merges = False

    def __init__(self, model: Decoder, cfg: PeftConfig, encoder: nn.Module):
        super().__init__(model, cfg)
        self.encoder = encoder
        self.P = cfg.virtual_tokens

    def prompt(self) -> Tensor:
        return self.encoder(torch.arange(self.P, device=self.model.embed.weight.device))  # (P, C)

    def logits(self, x: Tensor, segments: Tensor | None = None) -> Tensor:
        return self._run(x, None, segments)

    def loss(self, x: Tensor, y: Tensor, segments: Tensor | None = None) -> Tensor:
        return self._run(x, y, segments)

    def _run(self, x: Tensor, y: Tensor | None, segments: Tensor | None) -> Tensor:
        _check_fits(self.model, self.P, x.shape[1])
        prompt = self.prompt().expand(x.shape[0], -1, -1)  # (B, P, C)
        cache = None if segments is None else VirtualTokens(self.P, segments)
        return self.model(x, y, cache=cache, prompt=prompt)


class PromptEmbedding(nn.Module):
    """Prompt tuning's trained embeddings (peft's PromptEmbedding), started from the embeddings of random tokens."""

    def __init__(self, model: Decoder, P: int):
        super().__init__()
        self.embedding = nn.Embedding(P, model.cfg.dim, device=model.embed.weight.device)
        ids = torch.randint(0, model.cfg.vocab_size, (P,), device=model.embed.weight.device)
        self.embedding.weight.data.copy_(model.embed.weight.detach()[ids])

    def forward(self, indices: Tensor) -> Tensor:
        return self.embedding(indices)


class PromptEncoder(nn.Module):
    """P-tuning's encoder (peft's PromptEncoder): virtual token embeddings through an MLP, or a two-layer
    bidirectional LSTM and an MLP head."""

    def __init__(self, dim: int, P: int, hidden: int, kind: str):
        super().__init__()
        self.embedding = nn.Embedding(P, dim)
        self.lstm_head: nn.LSTM | None = None
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def forward(self, indices: Tensor) -> Tensor:
        h = self.embedding(indices)  # (P, C)
        if self.lstm_head is not None:
            h = self.lstm_head(h[None])[0][0]  # (P, 2 * hidden)
        return self.mlp_head(h)


class PrefixEncoder(nn.Module):
    """Prefix tuning's keys and values for every layer (peft's PrefixEncoder): trained directly, (P, L * 2 * kv_dim),
    or made by an MLP from (P, kv_dim) embeddings (the reparametrisation that steadies training)."""

    def __init__(self, kv_dim: int, n_layers: int, P: int, hidden: int):
        super().__init__()
        out = n_layers * 2 * kv_dim
        self.transform: nn.Sequential | None = None
        if hidden:
            self.embedding = nn.Embedding(P, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Embedding(P, out)

    def forward(self, indices: Tensor) -> Tensor:
        h = self.embedding(indices)
        return h if self.transform is None else self.transform(h)  # (P, L * 2 * kv_dim)


class PrefixTuned(Tuned):
    merges = False

    def __init__(self, model: Decoder, cfg: PeftConfig):
        super().__init__(model, cfg)
        c = model.cfg
        self.P = cfg.virtual_tokens
        self.encoder = PrefixEncoder(c.n_kv_heads * c.head_dim, c.n_layers, self.P, cfg.prefix_hidden)
        self.encoder.to(model.embed.weight.device)

    def prefix(self, B: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer (k, v), each (B, Hkv, P, D), in peft's order: layer i's key is slot 2i, its value 2i + 1."""
        c = self.model.cfg
        kv = self.encoder(torch.arange(self.P, device=self.model.embed.weight.device))
        kv = kv.view(self.P, 2 * c.n_layers, c.n_kv_heads, c.head_dim).permute(1, 2, 0, 3)  # (2L, Hkv, P, D)
        kv = kv[:, None].expand(-1, B, -1, -1, -1)  # (2L, B, Hkv, P, D)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(c.n_layers)]

    def logits(self, x: Tensor, segments: Tensor | None = None) -> Tensor:
        return self.loss(x, None, segments)

    def loss(self, x: Tensor, y: Tensor | None, segments: Tensor | None = None) -> Tensor:
        _check_fits(self.model, self.P, x.shape[1])
        return self.model(x, y, cache=VirtualTokens(self.P, segments, self.prefix(x.shape[0])))


def tune_prompt(model: Decoder, cfg: PeftConfig) -> Tuned:
    model.requires_grad_(False)
    return SoftPromptTuned(model, cfg, PromptEmbedding(model, cfg.virtual_tokens))


def tune_ptuning(model: Decoder, cfg: PeftConfig) -> Tuned:
    model.requires_grad_(False)
    dim = model.cfg.dim
    encoder = PromptEncoder(dim, cfg.virtual_tokens, cfg.encoder_hidden or dim, cfg.encoder)
    return SoftPromptTuned(model, cfg, encoder.to(model.embed.weight.device))


def tune_prefix(model: Decoder, cfg: PeftConfig) -> Tuned:
    model.requires_grad_(False)
    return PrefixTuned(model, cfg)
