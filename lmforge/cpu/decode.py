"""Decode steps in numpy for a Decoder on the CPU in fp32, reading the model's weights and its KV cache in place
(zero-copy views): batch-1 steps over the torch KVCache a torch prefill filled, and the serving engine's steps (many
sequences' new tokens, prompt chunks and single decodes, packed in rows) over its paged pool.

Why numpy: a step is ~4 matrix products per layer plus ~20-200 small ops, and a numpy op costs ~1 us of overhead
against 5-40 us for a torch op (nn.RMSNorm ~37 us). The matrix products and the attention go through the C kernels of
cpu/native.py where they are built, else through numpy's OpenBLAS (~290 tok/s, batch 1 only); the rest stays in
numpy. Integer-weight layers (compress.modules.QuantLinear) run only through the kernels, which read their codes in
place. For Llama-style layers (RMSNorm, SwiGLU, no biases) a step, an engine's or a batch-1 decode's, goes through
all layers in one kernel call (native.layers): on 2 cores 538-748 tok/s batch-1 against 94-115 for transformers on
benchmarks/bench_decode.py's model.

    decoder, kv = NumpyDecoder(model), CacheKV(cache)   # after model(prompt, cache=cache)
    logits = decoder.step(token, cache.pos, kv)         # (V,); then cache.advance(1)
    logits = decoder.forward(chunks, native.pools(k, v), block_size, all_rows)   # an engine step, with the kernels
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController

from lmforge.compress.modules import QuantLinear
from lmforge.cpu import native
from lmforge.models import Decoder, KVCache
from lmforge.models.layers import Positions
from lmforge.serve.paged import Chunk, PagedKVStore

Array = np.ndarray
# Every scalar below is a Python float: a numpy float64 scalar would promote the activations to float64 and make
# each x @ W convert the whole weight matrix to float64 (10x slower).


def _view(t: torch.Tensor) -> Array:
    """A numpy array sharing t's memory; BLAS takes either a row- or a column-major matrix without a copy."""
    a = t.detach().numpy()
    return a if a.flags.c_contiguous or a.flags.f_contiguous else np.ascontiguousarray(a)


def _quantized(linear: QuantLinear) -> native.Quantized:
    """The codes, scales and zeros of a QuantLinear, shared with torch (no dequantized copy)."""
    return native.Quantized(*(_view(t) for t in (linear.qweight, linear.scales, linear.zeros)), linear.bits,
                            linear.group_size)  # fmt: skip


def _weight(linear: nn.Module) -> Array | native.Quantized:
    """What the kernels read of a linear layer: a QuantLinear's codes, or nn.Linear's fp32 weight (out, in)."""
    return _quantized(linear) if type(linear) is QuantLinear else _view(linear.weight)


def _linear(linear: nn.Module, reuse_output: bool = True, batched: bool = False) -> Callable[[Array], Array]:
    """x (in,) or (N, in) -> linear(x), for nn.Linear or QuantLinear. reuse_output: the C kernels write every product
    into one array (per shape), valid until the next call (every layer's outputs are consumed before the next step;
    not the logits, which the caller keeps). batched: the serving engine's steps, whose many rows go through a packed
    copy of the weight."""
    threads = torch.get_num_threads()
    if type(linear) is QuantLinear:  # the allowlist admits it only with the kernels: they read its codes in place
        weight = _quantized(linear)
        matvec = native.qmatvec(weight, threads, reuse_output)
        if batched:
            rows = native.qmatmul(weight, threads, reuse_output)
        else:  # an unbatched decoder's rare many-row forward: a row at a time, no packed copy

            def rows(x: Array) -> Array:
                return np.stack([matvec(row).copy() for row in x])

        def matmul(x: Array) -> Array:
            return matvec(x) if x.ndim == 1 else rows(x)

    else:
        weight = linear.weight.detach()
        w_t = _view(weight.t())  # (in, out)
        if native.available() and weight.stride(1) == 1:
            # row-major, as nn.Linear keeps it: the fastest layout for one row (batch-1 decode), through matvec; many
            # rows go through a copy packed in panels of columns (2x the weight's memory, for the engine only), ~3x
            # torch's speed
            matvec = native.matvec(weight.numpy(), threads, reuse_output)
            rows = native.matmul(w_t, threads, reuse_output) if batched else w_t.__rmatmul__

            def matmul(x: Array) -> Array:
                return matvec(x) if x.ndim == 1 else rows(x)

        else:
            # without the C kernels prepare_for_decode stores W column-major, so W^T is a C-contiguous (in, out)
            # matrix: OpenBLAS's fastest GEMV (2.4 vs 3.8 ms a token for the row-major layout, read through a
            # transposed view)
            def matmul(x: Array) -> Array:
                return x @ w_t

    if linear.bias is None:
        return matmul
    b = _view(linear.bias)
    return lambda x: matmul(x) + b


def _mean_square(x: Array) -> Array:
    """(N, C) -> (N, 1), or (C,) -> an fp32 scalar: for batch-1 decode np.dot, ~3x cheaper than the row-wise einsum."""
    if x.ndim == 1:
        return np.dot(x, x) / x.shape[0]
    return np.einsum("ij,ij->i", x, x)[:, None] / x.shape[1]


def _rmsnorm(norm: nn.RMSNorm, eps: float) -> Callable[[Array], Array]:
    w = _view(norm.weight)
    if kernel := native.rmsnorm(w, eps, torch.get_num_threads()):  # one pass against ~7 numpy ops
        return kernel
    return lambda x: x * (1.0 / np.sqrt(_mean_square(x) + eps)) * w


def _layernorm(norm: nn.LayerNorm, eps: float) -> Callable[[Array], Array]:
    w = _view(norm.weight)

    def layernorm(x: Array) -> Array:
        x = x - x.mean(axis=-1, keepdims=True)
        return x * (1.0 / np.sqrt(_mean_square(x) + eps)) * w

    if norm.bias is None:
        return layernorm
    b = _view(norm.bias)
    return lambda x: layernorm(x) + b


NORMS = {"rmsnorm": _rmsnorm, "layernorm": _layernorm}


def _gelu(x: Array) -> Array:
    return F.gelu(torch.from_numpy(x)).numpy()  # exact erf GELU: numpy has no erf, so one torch op on a shared view


def _gelu_tanh(x: Array) -> Array:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def _gelu_mlp(activation: Callable[[Array], Array]) -> Callable:
    def build(mlp: nn.Module, batched: bool) -> Callable[[Array], Array]:
        up, down = _linear(mlp.up, batched=batched), _linear(mlp.down, batched=batched)
        return lambda x: down(activation(up(x)))

    return build


def _swiglu(mlp: nn.Module, batched: bool) -> Callable[[Array], Array]:
    gate_up, down, H = _linear(mlp.gate_up, batched=batched), _linear(mlp.down, batched=batched), mlp.down.in_features
    if silu_mul := native.silu_mul(H, torch.get_num_threads()):  # one pass against five numpy ops
        return lambda x: down(silu_mul(gate_up(x)))

    def swiglu(x: Array) -> Array:
        gu = gate_up(x)  # (N, 2H) or (2H,): gate, then up
        gate = gu[..., :H]
        return down(gate / (1.0 + np.exp(-gate)) * gu[..., H:])  # silu(gate) * up; exp overflow gives -0, as it should

    return swiglu


MLPS = {"gelu": _gelu_mlp(_gelu), "gelu_tanh": _gelu_mlp(_gelu_tanh), "swiglu": _swiglu}


class _Positions:
    """The numpy side of layers.Positions: embed, rotate (q and k stacked as (Hq + Hkv, D)) and bias the scores."""

    slopes: Array | None = None  # ALiBi's (Hq,) slopes, for the C attention kernel
    tables: tuple[Array, Array] | None = None  # RoPE's (T, D) cos and sin, for the C attention kernel

    def embed(self, x: Array, pos: Array | int) -> Array:
        """x: (N, C) token embeddings at positions pos (N,), or one (C,) at one position."""
        return x

    def rotate(self, qk: Array, pos: int) -> Array:
        return qk

    def bias(self, scores: Array) -> Array:
        """scores: (Hkv, G, S) of the newest query over all S cached keys."""
        return scores


class _TablePositions(_Positions):
    """Learned or sinusoidal: a (max_seq_len, C) table added to the token embedding."""

    def __init__(self, table: torch.Tensor):
        self.table = _view(table)

    def embed(self, x: Array, pos: Array | int) -> Array:
        return x + self.table[pos]


class _RotaryPositions(_Positions):
    def __init__(self, positions: Positions):
        self.cos = np.ascontiguousarray(_view(positions.cos))  # (T, D), the angles repeated for both halves
        self.sin = np.ascontiguousarray(_view(positions.sin))
        half = self.cos.shape[1] // 2
        # rotate_half(x) * sin == x[:, swap] * [-sin, sin]: one gather and one product instead of split, negate, concat
        self.signed_sin = np.concatenate([-self.sin[:, :half], self.sin[:, half:]], axis=1)
        self.swap = np.r_[half : 2 * half, 0:half]
        self.tables = self.cos, self.sin

    def rotate(self, qk: Array, pos: int) -> Array:
        return qk * self.cos[pos] + qk[:, self.swap] * self.signed_sin[pos]


class _ALiBiPositions(_Positions):
    def __init__(self, positions: Positions):
        cfg = positions.cfg
        self.slopes = np.ascontiguousarray(_view(positions.slopes), dtype=np.float32)  # (Hq,)
        slopes = self.slopes.reshape(cfg.n_kv_heads, -1, 1)  # (Hkv, G, 1): query head h uses kv head h // G
        # slope * (key position - query position) for distances -(T-1)..0; the newest query over S keys takes the last S
        self.table = slopes * np.arange(1 - cfg.max_seq_len, 1, dtype=np.float32)  # (Hkv, G, T)

    def bias(self, scores: Array) -> Array:
        return scores + self.table[:, :, -scores.shape[-1] :]


POSITIONS = {
    "learned": lambda positions: _TablePositions(positions.wpe.weight),
    "sinusoidal": lambda positions: _TablePositions(positions.table),
    "rope": _RotaryPositions,
    "alibi": _ALiBiPositions,
}


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()  # scans the loaded BLAS libraries once (~1 ms)


class CacheKV:
    """The numpy view of a batch-1 torch KVCache: the steps write and read the tensors the torch prefill filled."""

    def __init__(self, cache: KVCache):
        assert cache.k.shape[1] == 1 and cache.k.dtype == torch.float32, "a batch-1 fp32 cache"
        self.k, self.v = cache.k.numpy()[:, 0], cache.v.numpy()[:, 0]  # (layers, Hkv, max_len, D), shared with torch
        # for the C kernel: one block of max_len positions, the decoded token's end moved along
        self.pools = native.pools(self.k, self.v) if native.available() else []
        self.chunks = native.Chunks([[0]], [1], [1], self.k.shape[2]) if native.available() else None

    def write(self, layer: int, pos: int, k: Array, v: Array) -> None:
        self.k[layer, :, pos], self.v[layer, :, pos] = k, v

    def read(self, layer: int, length: int) -> tuple[Array, Array]:
        return self.k[layer, :, :length], self.v[layer, :, :length]  # (Hkv, S, D) views


class PagedKV:
    """One sequence's blocks of the serving engine's paged pool (serve/paged.py), in numpy."""

    def __init__(self, store: PagedKVStore, block_table: list[int]):
        self.k, self.v = store.k.numpy(), store.v.numpy()  # (layers, Hkv, blocks, block_size, D), shared with torch
        self.table, self.block_size = block_table, store.block_size
        self.pools = native.pools(self.k, self.v) if native.available() else []
        self.chunks = native.Chunks([block_table], [1], [1], store.block_size) if native.available() else None

    def write(self, layer: int, pos: int, k: Array, v: Array) -> None:
        block, offset = self.table[pos // self.block_size], pos % self.block_size
        self.k[layer, :, block, offset], self.v[layer, :, block, offset] = k, v

    def read(self, layer: int, length: int) -> tuple[Array, Array]:
        blocks = self.table[: -(-length // self.block_size)]
        first = blocks[0]
        # a sequence's blocks usually lie in a row (paged.BlockManager): then a slice is a view, not a gather (the
        # copy costs ~0.3 ms per token for 256 positions of the benchmark model)
        where = slice(first, first + len(blocks)) if blocks == list(range(first, first + len(blocks))) else blocks
        Hkv, D = self.k.shape[1], self.k.shape[-1]
        keys = self.k[layer][:, where].reshape(Hkv, -1, D)[:, :length]  # (Hkv, S, D)
        return keys, self.v[layer][:, where].reshape(Hkv, -1, D)[:, :length]


class NumpyDecoder:
    """Steps of `model` in numpy on as many threads as torch uses, through the C kernels where they are built
    (cpu/native.py): `step` decodes one token of one sequence over a CacheKV or PagedKV (numpy alone without the
    kernels); `forward`, with the kernels only, runs an engine step's packed chunks over the paged pool. batched: for
    forward's many rows, keep a copy of every weight packed for the matrix-product kernel. Its layers write into
    buffers of their own, so one decoder runs one step at a time (make one per thread)."""

    def __init__(self, model: Decoder, batched: bool = False):
        cfg = model.cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.embed = _view(model.embed.weight)  # (V, C)
        self.positions = POSITIONS[cfg.pos](model.positions)
        self.threads = torch.get_num_threads()
        H, positions = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), self.positions
        # None without the kernels: step() attends in numpy, forward() is not there
        self.attention = native.attention(*H, positions.slopes, positions.tables, self.threads, reuse_output=True)
        # every layer in one kernel call, for Llama-style layers: forward's rows over packed copies of the weights
        # (batched), step()'s one row over the weights where they are
        self.all_layers, self.batched = None, batched
        if self.attention and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.bias:
            weights = [
                native.LayerWeights(_view(b.attn_norm.weight), _weight(b.attn.qkv), _weight(b.attn.proj),
                                    _view(b.mlp_norm.weight), _weight(b.mlp.gate_up), _weight(b.mlp.down))
                for b in model.layers
            ]  # fmt: skip
            tables = positions.tables
            self.all_layers = native.layers(weights, cfg.norm_eps, *H, positions.slopes, tables, self.threads, batched)
        # with all_layers, these only serve an unbatched decoder's forward over several rows: no packed copies
        norm, many = NORMS[cfg.norm], batched and not self.all_layers
        self.layers = [
            (
                norm(block.attn_norm, cfg.norm_eps),
                _linear(block.attn.qkv, batched=many),
                _linear(block.attn.proj, batched=many),
                norm(block.mlp_norm, cfg.norm_eps),
                MLPS[cfg.mlp](block.mlp, many),
            )
            for block in model.layers
        ]
        self.norm = norm(model.norm, cfg.norm_eps)
        self.lm_head = _linear(model.lm_head, reuse_output=False, batched=batched)  # the logits are handed out

    def step(self, token: int, pos: int, kv: CacheKV | PagedKV) -> Array:
        """Logits (V,) after `token` at position `pos`, whose keys and values are written to `kv`."""
        if self.all_layers:  # against a kernel call per op, in-process: 484 -> 569 tok/s on 2 threads, 371 -> 404 on 1
            kv.chunks.advance_to(pos + 1)

            def layers(x: Array) -> Array:
                row = x[None].copy()  # x may be a row of the embedding table
                self.all_layers(row, kv.pools, kv.chunks)
                return row[0]

            return self._logits(token, pos, layers)
        # one (C,) vector throughout: numpy's 1-D ops cost less than their row-wise forms (a norm ~4 us against ~10)
        if self.attention:
            kv.chunks.advance_to(pos + 1)
            attend = self._attend_natively(kv.pools, kv.chunks)
        else:

            def attend(layer: int, qkv: Array) -> Array:
                return self._attend_in_numpy(layer, qkv, pos, kv)

        return self._logits(token, pos, self._each_layer(attend))

    def forward(self, chunks: list[Chunk], pools: list[native.KVPool], block_size: int, all_rows: list[bool]):
        """One engine step with the C kernels: the chunks' tokens packed in rows, their keys and values written to the
        paged pool (native.pools of the store); per chunk the logits (R, V) of every row (all_rows) or of its last."""
        counts = [len(c.tokens) for c in chunks]
        ends = [c.start + n for c, n in zip(chunks, counts, strict=True)]
        tables = [c.block_table[: -(-end // block_size)] for c, end in zip(chunks, ends, strict=True)]
        picked, last = [], 0
        for n, every in zip(counts, all_rows, strict=True):
            last += n
            picked += range(last - n, last) if every else [last - 1]
        where = native.Chunks(tables, ends, counts, block_size)
        if self.all_layers and (self.batched or last == 1):  # one token too: single-stream 458 -> 607 tok/s

            def layers(x: Array) -> Array:  # x: a new array of the embeddings (a gather), free to write in place
                self.all_layers(x, pools, where)
                return x

        elif len(picked) == last == 1:  # one token of one sequence: a vector throughout, as in step()
            layers = self._each_layer(self._attend_natively(pools, where))
            return [self._logits(chunks[0].tokens[0], chunks[0].start, layers)[None]]
        else:
            layers = self._each_layer(self._attend_natively(pools, where))
        tokens = [t for c in chunks for t in c.tokens]
        positions = [p for c, n in zip(chunks, counts, strict=True) for p in range(c.start, c.start + n)]
        logits = self._logits(tokens, np.array(positions), layers, picked)
        split, row = [], 0
        for n, every in zip(counts, all_rows, strict=True):
            split.append(logits[row : row + (n if every else 1)])
            row += n if every else 1
        return split

    def _attend_natively(self, pools: list[native.KVPool], chunks: native.Chunks) -> Callable[[int, Array], Array]:
        attention = self.attention
        # the output stays valid until the next layer's: proj consumes it first
        return lambda layer, qkv: attention(qkv, pools[layer], chunks)

    def _logits(self, tokens: list[int] | int, positions: Array | int, layers: Callable, rows: list[int] = ()) -> Array:
        """The logits (len(rows), V) of these rows of the tokens at these positions, or (V,) for one token. layers:
        the embeddings (N, C) or (C,) -> the last layer's output, writing the keys and values to the cache."""
        # the BLAS limit is set per step (~10 us), so it never outlives a step while the generator waits
        with _threadpools().limit(limits=self.threads, user_api="blas"), np.errstate(over="ignore"):
            x = layers(self.positions.embed(self.embed[tokens], positions))
            return self.lm_head(self.norm(x[rows] if x.ndim == 2 and len(rows) < len(x) else x))

    def _each_layer(self, attend: Callable[[int, Array], Array]) -> Callable[[Array], Array]:
        """The layers one after another. attend: a layer's qkv (N, W) or (W,) -> its attention output (N, Hq D) or
        (Hq D,) over the cache, where it writes their keys and values."""

        def layers(x: Array) -> Array:  # x is never written in place: for one token, maybe a table's row
            for layer, (attn_norm, qkv, proj, mlp_norm, mlp) in enumerate(self.layers):
                x = x + proj(attend(layer, qkv(attn_norm(x))))
                x = x + mlp(mlp_norm(x))
            return x

        return layers

    def _attend_in_numpy(self, layer: int, qkv: Array, pos: int, kv: CacheKV | PagedKV) -> Array:
        """qkv: ((Hq + 2 Hkv) D,) of the newest token -> its attention output (Hq D,) over the cache."""
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qk = self.positions.rotate(qkv[: (Hq + Hkv) * D].reshape(Hq + Hkv, D), pos)  # (Hq + Hkv, D)
        kv.write(layer, pos, qk[Hq:], qkv[(Hq + Hkv) * D :].reshape(Hkv, D))
        keys, values = kv.read(layer, pos + 1)  # (Hkv, S, D)
        q = (qk[:Hq] * self.scale).reshape(Hkv, Hq // Hkv, D)  # (Hkv, G, D): G query heads share a kv head
        scores = self.positions.bias(q @ keys.transpose(0, 2, 1))  # (Hkv, G, S)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        return (scores @ values).reshape(Hq * D)  # (Hkv, G, D) -> (Hq D,)
