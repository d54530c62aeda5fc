"""Throughput accounting: the device's measured matmul peak, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def matmul_peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of a few square matmuls on this device: the denominator of MFU (measured, not a spec sheet)."""
    n = 1024 if device_type == "cpu" else 8192
    # a private generator: measuring must not move the global RNG that dropout and resume depend on
    gen = torch.Generator(device=device_type).manual_seed(0)
    a = torch.randn(n, n, device=device_type, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device_type, dtype=dtype, generator=gen)
    best = float("inf")
    for _ in range(4):
        if device_type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
