"""The two KV caches attention runs through (attention.Cache): a contiguous one for a batch of sequences at one
position, and one serving-engine step of many sequences over a paged block pool (PagedAttention, Kwon et al., 2023).

In the block pool a sequence's keys and values live in `block_size`-token blocks anywhere in the pool; its block table
maps position p to slot `table[p // block_size] * block_size + p % block_size` (serve/paged.py's BlockManager hands
out the blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.attention import ScoreBias
from lmforge.models.config import ModelConfig


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to `max_len` positions."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def positions(self, T: int, device: torch.device) -> Tensor:
        return torch.arange(self.pos, self.pos + T, device=device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """Store k, v: (B, Hkv, T, D) at the current position; attend q: (B, H, T, D) over all keys so far."""
        T, end = q.shape[2], self.pos + k.shape[2]
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        k, v = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, Hkv, S, D), S = cached + T
        q_pos = torch.arange(self.pos, end, device=q.device)
        # one query, the last token, sees every key whether causal or not: no mask to build on each decoded token
        mask = bias(q_pos, end) if T > 1 else bias.positional(q_pos, end)
        mask = None if mask is None else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    def advance(self, T: int) -> None:
        self.pos += T


class PagedKVStore:
    """The block pool of one model: keys and values of every layer, (n_layers, Hkv, num_blocks, block_size, D).

    Heads first: the keys of a head of a sequence whose blocks lie in a row (see BlockManager) are one contiguous
    (S, D) stretch, which the C attention kernel streams and numpy reads as a view; gathering scattered blocks copies
    whole (block_size, D) tiles. (Blocks first, vLLM's order, reads scattered blocks ~1.1x faster, and blocks in a row
    ~1.6x slower.)"""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks, block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype=torch.float32) -> int:
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize


@dataclass
class Chunk:
    """Tokens of one sequence computed in a step: positions [start, start + len(tokens)) of its block table."""

    tokens: list[int]
    start: int
    block_table: list[int]
    adapter: int = 0
    """Which served LoRA adapter computes these tokens (serve/adapters.py); 0 is the base model."""


class PagedBatch:
    """One engine step's tokens of many sequences packed into (1, N), passed to the model as its cache: the torch path
    of the engine, where the numpy steps and C kernels do not run (a GPU, bf16, a streamed model).

    Single-token chunks (decodes) attend together in one padded SDPA batch of gathered blocks; longer chunks (prefills)
    attend one by one.
    """

    def __init__(self, store: PagedKVStore, chunks: list[Chunk], device=None):
        bs = store.block_size
        self.store = store
        self.ids = torch.tensor([[t for c in chunks for t in c.tokens]], device=device)  # (1, N)
        pos, slots, row = [], [], 0
        decode_rows, decode_tables, decode_lengths, self.groups = [], [], [], []
        for c in chunks:
            span = range(c.start, c.start + len(c.tokens))
            pos += span
            slots += [c.block_table[p // bs] * bs + p % bs for p in span]
            length = c.start + len(c.tokens)
            table = c.block_table[: -(-length // bs)]  # the blocks holding positions [0, length)
            if len(c.tokens) == 1:
                decode_rows.append([row])
                decode_tables.append(table)
                decode_lengths.append(length)
            else:
                rows = [list(range(row, row + len(c.tokens)))]
                self.groups.append(_Group([list(span)], rows, [table], [length], bs, device))
            row += len(c.tokens)
        self.decodes: _Group | None = None
        if decode_rows:
            q_pos = [[n - 1] for n in decode_lengths]
            self.decodes = _Group(q_pos, decode_rows, decode_tables, decode_lengths, bs, device)
            self.groups.append(self.decodes)
        self.pos = torch.tensor(pos, device=device)  # (N,)
        self.slots = torch.tensor(slots, device=device)  # (N,)

    def positions(self, T: int, device: torch.device) -> Tensor:
        return self.pos

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: ScoreBias) -> Tensor:
        """q: (1, H, N, D), k and v: (1, Hkv, N, D) of the new tokens -> (1, H, N, D)."""
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]  # (Hkv, blocks, block_size, D)
        Hkv, _, _, D = k_pool.shape
        k_pool.view(Hkv, -1, D).index_copy_(1, self.slots, k[0].to(k_pool.dtype))
        v_pool.view(Hkv, -1, D).index_copy_(1, self.slots, v[0].to(v_pool.dtype))
        out = torch.empty_like(q)
        for g in self.groups:
            B, S = g.tables.shape[0], g.tables.shape[1] * self.store.block_size
            qg = q[0][:, g.rows].transpose(0, 1)  # (B, H, Tq, D)
            kg = k_pool.index_select(1, g.tables.flatten()).view(Hkv, B, S, D).transpose(0, 1).to(q.dtype)
            vg = v_pool.index_select(1, g.tables.flatten()).view(Hkv, B, S, D).transpose(0, 1).to(q.dtype)
            mask = g.mask(bias, q.dtype)
            y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, enable_gqa=Hkv != q.shape[1])
            out[0][:, g.rows] = y.transpose(0, 1)
        return out

    def advance(self, T: int) -> None:
        pass  # the engine advances each sequence itself


class _Group:
    """Sequences attended in one SDPA call: query rows (B, Tq) into the packed batch, block tables (B, blocks)."""

    def __init__(self, q_pos: list[list[int]], rows: list[list[int]], tables: list[list[int]], lengths, bs, device):
        width = max(len(t) for t in tables)
        self.rows = torch.tensor(rows, device=device)  # (B, Tq)
        # padded with each sequence's own last block, never another's: the mask's -inf does not hide NaN keys
        # (NaN + -inf is NaN), and a block another sequence is writing in this step may hold them
        self.tables = torch.tensor([t + t[-1:] * (width - len(t)) for t in tables], device=device)  # (B, blocks)
        self.q_pos, self.lengths, self.block_size = q_pos, lengths, bs
        self._masks: dict[tuple[ScoreBias, torch.dtype], Tensor] = {}  # built in a step's first layer, then reused

    def mask(self, bias: ScoreBias, dtype: torch.dtype) -> Tensor:
        """(B, 1|H, Tq, S) additive mask: `bias` within each sequence, -inf past its end."""
        if (bias, dtype) not in self._masks:
            S = self.tables.shape[1] * self.block_size
            device = self.tables.device
            parts = []
            for q_pos, length in zip(self.q_pos, self.lengths, strict=True):
                b = bias(torch.tensor(q_pos, device=device), length)  # (1, 1|H, Tq, length) or None
                if b is None:
                    b = torch.zeros(1, 1, len(q_pos), length, device=device)
                parts.append(F.pad(b, (0, S - length), value=float("-inf")))
            heads = max(p.shape[1] for p in parts)
            self._masks[bias, dtype] = torch.cat([p.expand(1, heads, -1, -1) for p in parts]).to(dtype)
        return self._masks[bias, dtype]
