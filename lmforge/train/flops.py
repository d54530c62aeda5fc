"""Throughput accounting: the device's measured matmul peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def matmul_peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of a few square matmuls on this device: the denominator of MFU (measured, not a spec sheet)."""
    sizes = (1024, 2048) if device_type == "cpu" else (8192,)
    if device_type == "cpu" and dtype == torch.float16:
        # most CPUs have no fp16 matmul units: a 2048^3 fp16 matmul took ~20 s here (measured), so a small one
        sizes = (256,)
    # a private generator: measuring must not move the global RNG that dropout and resume depend on
    gen = torch.Generator(device=device_type).manual_seed(0)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device_type, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device_type, dtype=dtype, generator=gen)
        for _ in range(6):  # best of several: a busy machine only ever makes a run slower
            if device_type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if device_type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best
