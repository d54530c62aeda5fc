"""The CPU runner of the serving engine and of batch-1 decode: steps of an allowlisted model (allowlist.py) in numpy
with the C kernels of native.py, reading the model's weights and KV cache in place.

On the CPU in fp32 an engine step runs in numpy with the kernels (decode.NumpyDecoder.forward; the runner keeps a copy
of each weight packed for its many-row products, twice the weights' memory; of an integer layer's codes, a packed copy
of the codes). Without the kernels only single decodes
run in numpy, and steps of several rows go to the torch runner it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lmforge.cpu import native
from lmforge.cpu.allowlist import unsupported_reason
from lmforge.cpu.decode import CacheKV, NumpyDecoder, PagedKV
from lmforge.models import Decoder, KVCache
from lmforge.serve.paged import Chunk, PagedKVStore


class CpuRunner:
    """Runs an engine step's packed chunks for `model` over `store` (see the module doc); `fallback` runs what
    numpy alone cannot (several rows without the kernels). Made once, at the engine's start-up."""

    def __init__(self, model: Decoder, store: PagedKVStore, fallback):
        assert unsupported_reason(model) is None and store.k.device.type == "cpu", "an allowlisted model on the CPU"
        self.store, self.fallback = store, fallback
        self.pools = native.pools(store.k.numpy(), store.v.numpy()) if native.available() else []
        self.decoder = NumpyDecoder(model, batched=bool(self.pools))

    def run(self, chunks: list[Chunk], all_rows: list[bool]) -> list[Tensor]:
        """Per chunk the float logits of every row (all_rows) or of its last row, (R, V)."""
        decoder = self.decoder
        if decoder.attention:  # the C kernels: every step in numpy
            return [torch.from_numpy(r) for r in decoder.forward(chunks, self.pools, self.store.block_size, all_rows)]
        if len(chunks) == 1 and len(chunks[0].tokens) == 1 and not all_rows[0]:  # one user: numpy alone
            (chunk,) = chunks
            logits = decoder.step(chunk.tokens[0], chunk.start, PagedKV(self.store, chunk.block_table))
            return [torch.from_numpy(logits)[None]]  # (1, V)
        return self.fallback.run(chunks, all_rows)


def numpy_step(model: Decoder, cache: KVCache) -> Callable[[int], np.ndarray]:
    """Batch-1 decode steps in numpy (sampling.generate_tokens' `step`), reading and extending the cache the torch
    prefill filled."""
    decoder, kv = NumpyDecoder(model), CacheKV(cache)

    def step(token: int) -> np.ndarray:
        logits = decoder.step(token, cache.pos, kv)  # (V,)
        cache.advance(1)
        return logits

    return step


def prepare_for_decode(model: Decoder) -> Decoder:
    """Lay the linear weights out for the fastest batch-1 decode on the CPU (same values and shapes).

    Where the C kernel (native.py) decodes the model, that is nn.Linear's row-major layout, left as it is.
    Otherwise every weight is stored column-major: numpy's OpenBLAS reads W^T as a C-contiguous (in, out) matrix, and
    torch's MKL reads it at ~16 GB/s against ~10 GB/s row-major (2-core AMD EPYC, benchmarks/bench_decode.py).
    For inference only: training is slower this way and safetensors refuses to save non-contiguous weights.
    """
    if model.lm_head.weight.device.type != "cpu" or (native.available() and unsupported_reason(model) is None):
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()  # (out, in) shape, strides (1, out)
    return model
