"""The C kernels of batch-1 CPU decode (decode_kernels.c), compiled on first use with the machine's C compiler and
loaded with ctypes: a matrix-vector product and one query's attention over the KV cache.

Why: numpy's OpenBLAS runs a matrix-vector product on one thread below ~460k weights, so on the 2-core dev box most
of a small model's weights (a 384 x 1152 qkv, a 1024 x 384 down projection) are read by one core. The C kernel splits
the rows of every weight over torch's thread count: the 25 weights of benchmarks/bench_decode.py's model take 1.5-2.1
ms a token against 2.8-3.2 ms for OpenBLAS on 2 threads, and about as long on one thread. The attention kernel does in
one call what takes numpy ~20 small ops per layer.

Where no C compiler with OpenMP is found, compilation fails, or LMFORGE_NATIVE=0, `available()` is False, `matvec` and
`attention` give None, and the decoder runs on numpy alone. The library is cached under ~/.cache/lmforge/native
(XDG_CACHE_HOME), named by a hash of the source, the compiler and the CPU's flags, written to a temporary name and
renamed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

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
    library.lmforge_attend.argtypes = [p, p, n, n, p, n, n, p, p, i, i, i, i, i]
    library.lmforge_gemv.restype = library.lmforge_attend.restype = None
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


def attention(
    n_heads: int, n_kv_heads: int, head_dim: int, slopes: np.ndarray | None, threads: int, reuse_output: bool = False
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None:
    """(q, keys, values) -> softmax(q k^T + bias) v per query head, as a (n_heads * head_dim,) array; None without
    the kernels. q: (Hq, D) rotated and scaled, contiguous; keys and values: (Hkv, S, D) views of the cache with a unit
    last stride; slopes: ALiBi's (Hq,) slopes, or None. reuse_output as for matvec."""
    if (library := _library()) is None:
        return None
    Hq, Hkv, D = n_heads, n_kv_heads, head_dim
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads cannot share {Hkv} kv heads evenly")
    if slopes is not None:
        if slopes.dtype != np.float32 or slopes.shape != (Hq,):
            raise ValueError(f"ALiBi slopes must be a ({Hq},) fp32 array, not {slopes.dtype} {slopes.shape}")
        slopes = np.ascontiguousarray(slopes)
    kernel, slopes_address = library.lmforge_attend, None if slopes is None else slopes.ctypes.data
    output = _output(Hq * D, reuse_output)

    def run(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        if q.shape != (Hq, D) or not q.flags.c_contiguous or keys.shape != values.shape or keys.shape[::2] != (Hkv, D):
            raise ValueError(
                f"attention takes a contiguous ({Hq}, {D}) q and ({Hkv}, S, {D}) keys and values, not {q.shape}, "
                f"{keys.shape}, {values.shape}"
            )
        for a, what in ((q, "q"), (keys, "the keys"), (values, "the values")):
            _check(a, what)
        out, out_address = output()
        k_head, k_pos = keys.strides[0] // 4, keys.strides[1] // 4
        v_head, v_pos = values.strides[0] // 4, values.strides[1] // 4
        S = keys.shape[1]
        kernel(q.ctypes.data, keys.ctypes.data, k_head, k_pos, values.ctypes.data, v_head, v_pos, slopes_address,
               out_address, Hq, Hkv, S, D, threads)  # fmt: skip
        return out

    run.slopes = slopes  # keeps the slopes alive as long as their address is used
    return run
