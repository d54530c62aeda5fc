"""Paged KV cache (PagedAttention, Kwon et al., 2023): fixed-size blocks, a block manager, per-sequence block tables.

A sequence's keys and values live in `block_size`-token blocks anywhere in one preallocated pool; its block table
maps position p to slot `table[p // block_size] * block_size + p % block_size`. Only the last block of a sequence
can be partly empty, so the waste is under one block per sequence. Full blocks are also indexed by a hash of
their tokens and of everything before them, so a later request with the same prefix reuses them (prefix caching);
unreferenced cached blocks are evicted least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.config import ModelConfig
from lmforge.models.layers import Positions


class BlockManager:
    """Which blocks are free, how many sequences use each, and which full blocks hold which token prefix."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.prefix_hits = 0  # blocks reused from the prefix cache
        self.prefix_queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """A block for one sequence; evicts the least recently used cached prefix if the block held one."""
        if not self.free:
            raise RuntimeError("no free KV block; the scheduler must check num_free first")
        block, _ = self.free.popitem(last=False)
        if block in self.hash_of:
            del self.by_hash[self.hash_of.pop(block)]
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        # freed in reverse so a sequence's last blocks, the least likely to be shared, are evicted first
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None

    def lookup(self, block_hash: int) -> int | None:
        """The cached block holding this prefix hash, now referenced once more; None on a miss."""
        self.prefix_queries += 1
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1
        self.prefix_hits += 1
        return block

    def register(self, block: int, block_hash: int) -> None:
        """Index a full, computed block by its prefix hash (the first block with a given prefix wins)."""
        if block_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[block_hash] = block
            self.hash_of[block] = block_hash


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """One hash per full block, each covering the block's tokens and every token before it."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        hashes.append(parent)
    return hashes


class PagedKVStore:
    """The block pool of one model: keys and values of every layer, (n_layers, num_blocks, Hkv, block_size, D).

    Blocks first, as vLLM lays them out: a block holds every kv head's keys for its positions in one piece (6 KB for
    benchmarks/bench_serve.py's model, against 1 KB per head heads-first), which the C attention kernel reads from
    memory ~1.5x faster when a step's sequences have their blocks all over the pool."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, num_blocks, cfg.n_kv_heads, block_size, cfg.head_dim)
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


class PagedBatch:
    """One engine step's tokens of many sequences packed into (1, N), passed to the model as its cache: the torch path
    of the engine, where the numpy steps and C kernels of cpu_decode.py do not run (a GPU, bf16, a streamed model).

    Single-token chunks (decodes) attend together in one padded SDPA batch of gathered blocks; longer chunks (prefills)
    attend one by one.
    """

    def __init__(self, store: PagedKVStore, chunks: list[Chunk], device=None):
        bs = store.block_size
        self.store = store
        self.ids = torch.tensor([[t for c in chunks for t in c.tokens]], device=device)  # (1, N)
        pos, slot_blocks, offsets, row = [], [], [], 0
        decode_rows, decode_tables, decode_lengths, self.groups = [], [], [], []
        for c in chunks:
            span = range(c.start, c.start + len(c.tokens))
            pos += span
            slot_blocks += [c.block_table[p // bs] for p in span]
            offsets += [p % bs for p in span]
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
        self.slot_blocks = torch.tensor(slot_blocks, device=device)  # (N,): where each new token's k and v go
        self.offsets = torch.tensor(offsets, device=device)

    def positions(self, T: int, device: torch.device) -> Tensor:
        return self.pos

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Positions) -> Tensor:
        """q: (1, H, N, D), k and v: (1, Hkv, N, D) of the new tokens -> (1, H, N, D)."""
        k_pool, v_pool = self.store.k[layer], self.store.v[layer]  # (blocks, Hkv, block_size, D)
        Hkv = k_pool.shape[1]
        k_pool[self.slot_blocks, :, self.offsets] = k[0].transpose(0, 1).to(k_pool.dtype)  # (N, Hkv, D)
        v_pool[self.slot_blocks, :, self.offsets] = v[0].transpose(0, 1).to(v_pool.dtype)
        out = torch.empty_like(q)
        for g in self.groups:
            qg = q[0][:, g.rows].transpose(0, 1)  # (B, H, Tq, D)
            kg, vg = (gather(pool, g.tables).to(q.dtype) for pool in (k_pool, v_pool))  # (B, Hkv, S, D)
            y = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=g.bias(positions, q.dtype), enable_gqa=Hkv != q.shape[1]
            )
            out[0][:, g.rows] = y.transpose(0, 1)
        return out

    def advance(self, T: int) -> None:
        pass  # the engine advances each sequence itself


def gather(pool: Tensor, tables: Tensor) -> Tensor:
    """pool (blocks, Hkv, block_size, D), tables (B, n) -> (B, Hkv, n * block_size, D): the blocks of each
    sequence in table order."""
    B, n = tables.shape
    _, Hkv, bs, D = pool.shape
    return pool.index_select(0, tables.flatten()).view(B, n, Hkv, bs, D).transpose(1, 2).reshape(B, Hkv, n * bs, D)


class _Group:
    """Sequences attended in one SDPA call: query rows (B, Tq) into the packed batch, block tables (B, blocks)."""

    def __init__(self, q_pos: list[list[int]], rows: list[list[int]], tables: list[list[int]], lengths, bs, device):
        width = max(len(t) for t in tables)
        self.rows = torch.tensor(rows, device=device)  # (B, Tq)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)  # (B, blocks)
        self.q_pos, self.lengths, self.block_size = q_pos, lengths, bs
        self._bias: Tensor | None = None

    def bias(self, positions: Positions, dtype: torch.dtype) -> Tensor:
        """(B, 1|H, Tq, S) additive mask: causal within each sequence, -inf past its end, plus ALiBi if used."""
        if self._bias is None:
            S = self.tables.shape[1] * self.block_size
            device = self.tables.device
            parts = []
            for q_pos, length in zip(self.q_pos, self.lengths, strict=True):
                qp = torch.tensor(q_pos, device=device)
                b = positions.bias(qp, length)  # (1, H, Tq, length) or None
                if b is None:
                    b = torch.zeros(1, 1, len(q_pos), length, device=device)
                    b.masked_fill_(torch.arange(length, device=device)[None, :] > qp[:, None], float("-inf"))
                parts.append(F.pad(b, (0, S - length), value=float("-inf")))
            heads = max(p.shape[1] for p in parts)
            self._bias = torch.cat([p.expand(1, heads, -1, -1) for p in parts]).to(dtype)
        return self._bias
