"""The C kernels of batch-1 CPU decode (decode_kernels.c), compiled on first use with the machine's C compiler and
loaded with ctypes: a matrix-vector product, and one layer's attention for the newest token over a paged KV cache.

Why: numpy's OpenBLAS runs a matrix-vector product on one thread below ~460k weights, so on the 2-core dev box most
of a small model's weights (a 384 x 1152 qkv, a 1024 x 384 down projection) are read by one core. The C kernel splits
the rows of every weight over torch's thread count: the 25 weights of benchmarks/bench_decode.py's model take 1.5-2.1
ms a token against 2.8-3.2 ms for OpenBLAS on 2 threads, and about as long on one thread. The attention kernel does in
one call (RoPE, the cache write, attention over the blocks in place) what takes numpy ~20 small ops and a gather.

Where no C compiler with OpenMP is found, compilation fails, or LMFORGE_NATIVE=0, `available()` is False, `matvec` and
`attention` give None, and the decoder runs on numpy alone. The library is cached under ~/.cache/lmforge/native
(XDG_CACHE_HOME), named by a hash of the source, the compiler and the CPU's flags, written to a temporary name and
renamed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

SOURCE = Path(__file__).with_name("decode_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge" / "native"


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.processor())


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_flags()]).encode())
    library = cache_dir() / f"decode_kernels-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=library.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, library)  # another process building the same key at once writes the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if os.environ.get("LMFORGE_NATIVE") == "0" or compiler is None:
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError):
        return None
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    library.lmforge_gemv.argtypes = [p, n, p, p, i, i, i]
    library.lmforge_attention.argtypes = [p, p, p, p, p, n, n, p, i, i, p, ctypes.c_float, p, i, i, i, i]
    library.lmforge_gemv.restype = library.lmforge_attention.restype = None
    return library


def available() -> bool:
    """Whether the kernels are built and loaded (see the module doc for when they are not)."""
    return _library() is not None


def _check(a: np.ndarray, what: str) -> None:
    if a.dtype != np.float32 or a.strides[-1] != 4:
        raise ValueError(f"{what} must be fp32 with a unit last stride, not {a.dtype} with strides {a.strides}")


def _output(size: int, reuse: bool) -> Callable[[], tuple[np.ndarray, int]]:
    """A new array per call, or one array whose every call overwrites the last (its address taken once: numpy's
    `.ctypes.data` costs ~1.7 us, a few percent of a decode step over ~30 calls)."""
    if not reuse:
        return lambda: ((y := np.empty(size, np.float32)), y.ctypes.data)
    buffer = np.empty(size, np.float32)
    address = buffer.ctypes.data
    return lambda: (buffer, address)


def matvec(w: np.ndarray, threads: int, reuse_output: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """x (cols,) -> W x (rows,) for a fixed row-major fp32 weight w (rows, cols) on `threads` threads; None without
    the kernels. reuse_output: every product is written to one array, valid until the next call."""
    if (library := _library()) is None:
        return None
    _check(w, "the weight")
    kernel, (rows, cols), address, row_stride = library.lmforge_gemv, w.shape, w.ctypes.data, w.strides[0] // 4
    output = _output(rows, reuse_output)

    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or x.shape != (cols,):
            raise ValueError(f"a ({rows}, {cols}) weight takes a ({cols},) fp32 vector, not {x.dtype} {x.shape}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        y, y_address = output()
        kernel(address, row_stride, x.ctypes.data, y_address, rows, cols, threads)
        return y

    run.weight = w  # keeps the weight alive as long as its address is used
    return run


class KVLayout(NamedTuple):  # a tuple: the engine makes one per layer per step
    """Where one layer's keys and values live, for the attention kernel: the vector of kv head g at position s starts
    at address + 4 * (g * head_stride + table[s // block_size] * block_stride + (s % block_size) * head_dim).
    `capacity` is the positions the table covers; the owner keeps the arrays (and the int32 table) alive."""

    keys: int
    values: int
    head_stride: int
    block_stride: int
    table: int
    block_size: int
    capacity: int


def layouts(k: np.ndarray, v: np.ndarray, table: np.ndarray) -> list[KVLayout]:
    """Per layer, where the attention kernel finds k and v: (layers, Hkv, max_len, D) arrays with the int32 table [0],
    or (layers, Hkv, blocks, block_size, D) pools with a sequence's int32 block table. The caller keeps all three."""
    assert k.shape == v.shape and k.strides == v.strides and k.dtype == np.float32 and k.strides[-1] == 4
    assert k.strides[-2] == 4 * k.shape[-1] and table.dtype == np.int32, "positions of a block one after another"
    block_size = k.shape[-2]
    head, block = k.strides[1] // 4, (k.strides[2] // 4 if k.ndim == 5 else 0)
    keys, values, table_address, capacity = k.ctypes.data, v.ctypes.data, table.ctypes.data, len(table) * block_size
    return [
        KVLayout(keys + offset, values + offset, head, block, table_address, block_size, capacity)
        for offset in range(0, k.shape[0] * k.strides[0], k.strides[0])
    ]


def attention(
    n_heads: int, n_kv_heads: int, head_dim: int, slopes: np.ndarray | None, threads: int, reuse_output: bool = False
) -> Callable[..., np.ndarray] | None:
    """(qkv, rope, layout, length[, out]) -> the newest token's attention output (n_heads * head_dim,); None without
    the kernels. qkv: its ((Hq + 2 Hkv) D,) projections, not yet rotated; rope: the addresses of the (D,) cos and sin
    rows of its position, or None; layout: this layer's cache, where its k and v are written at position length - 1
    and positions [0, length) are read; out: a contiguous (Hq D,) fp32 array to write to instead of a new (or the
    reused) one. slopes: ALiBi's (Hq,) slopes, or None. reuse_output as for matvec."""
    if (library := _library()) is None:
        return None
    Hq, Hkv, D = n_heads, n_kv_heads, head_dim
    if Hq % Hkv or D % 2:
        raise ValueError(f"{Hq} query heads of {D} cannot share {Hkv} kv heads evenly with an even head size")
    if slopes is not None:
        if slopes.dtype != np.float32 or slopes.shape != (Hq,):
            raise ValueError(f"ALiBi slopes must be a ({Hq},) fp32 array, not {slopes.dtype} {slopes.shape}")
        slopes = np.ascontiguousarray(slopes)
    kernel, slopes_address = library.lmforge_attention, None if slopes is None else slopes.ctypes.data
    scale, output, size = 1.0 / math.sqrt(D), _output(Hq * D, reuse_output), (Hq + 2 * Hkv) * D

    def run(
        qkv: np.ndarray, rope: tuple[int, int] | None, layout: KVLayout, length: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        for a, n, what in ((qkv, size, "qkv"), (out, Hq * D, "out")):
            if a is not None and (a.dtype != np.float32 or a.shape != (n,) or not a.flags.c_contiguous):
                raise ValueError(f"attention takes a contiguous ({n},) fp32 {what}, not {a.dtype} {a.shape}")
        if not 0 < length <= layout.capacity:
            raise ValueError(f"position {length - 1} is outside the cache's {layout.capacity} positions")
        cos, sin = rope or (None, None)
        out, out_address = output() if out is None else (out, out.ctypes.data)
        cache = (layout.keys, layout.values, layout.head_stride, layout.block_stride, layout.table, layout.block_size)
        kernel(qkv.ctypes.data, cos, sin, *cache, length, slopes_address, scale, out_address, Hq, Hkv, D, threads)
        return out

    run.slopes = slopes  # keeps the slopes alive as long as their address is used
    return run
