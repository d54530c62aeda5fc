"""What this machine can do: matmul peak (torch fp32/bf16, numpy), memory bandwidth, thread setup for the benchmarks.

MFU in the benchmarks is divided by the *measured* matmul peak of the dtype, not a datasheet figure, so it reads as
"fraction of what a plain large matmul gets here". Run `python benchmarks/machine.py` to print the figures.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def require_data(path: Path) -> Path:
    """`path` if it exists; else one line saying what is missing, and exit 2 (a bare clone has no ../shared/data)."""
    if not path.exists():
        print(
            f"{path} is missing: this benchmark reads ../shared/data beside the repository; pass another path",
            file=sys.stderr,
        )
        sys.exit(2)
    return path


def set_threads(n: int | None = None) -> int:
    """Use `n` intra-op threads (default: every core the process may run on); return the count."""
    n = n or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (1024, 1536, 2048)) -> float:
    """Best GFLOP/s of square torch matmuls of `dtype` (2*n^3 FLOPs each) over a few sizes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        seconds = _best_seconds(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), repeats=5)
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def numpy_matmul_gflops(n: int = 2048) -> float:
    """GFLOP/s of a float32 numpy matmul (whatever BLAS numpy links), for comparison with torch's."""
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats=3) / 1e9


def memory_bandwidth_gbs(mib: int = 512) -> float:
    """GB/s of copying a large fp32 tensor (read + write counted), far larger than the caches."""
    src = torch.empty(mib * 2**20 // 4).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), repeats=5) / 1e9


if __name__ == "__main__":
    threads = set_threads()
    print(f"threads {threads}, cpu capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    print(f"torch fp32 matmul peak  {matmul_peak_gflops(torch.float32):8.1f} GFLOP/s")
    print(f"torch bf16 matmul peak  {matmul_peak_gflops(torch.bfloat16):8.1f} GFLOP/s")
    print(f"numpy fp32 matmul       {numpy_matmul_gflops():8.1f} GFLOP/s")
    print(f"memory copy bandwidth   {memory_bandwidth_gbs():8.1f} GB/s")
