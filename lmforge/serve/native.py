"""The C kernels of batch-1 CPU decode (decode_kernels.c), compiled on first use with the machine's C compiler and
loaded with ctypes: a matrix-vector product and one query's attention over the KV cache.

Why: numpy's OpenBLAS runs a matrix-vector product on one thread below ~460k weights, so on the 2-core dev box most
of a small model's weights (a 384 x 1152 qkv, a 1024 x 384 down projection) are read by one core. The C kernel splits
the rows of every weight over torch's thread count: the 25 weights of benchmarks/bench_decode.py's model take 1.5-2.1
ms a token against 2.8-3.2 ms for OpenBLAS on 2 threads, and about as long on one thread. The attention kernel does in
one call what takes numpy ~20 small ops per layer.

Where no C compiler with OpenMP is found, compilation fails, or LMFORGE_NATIVE=0, `gemv()` and `attend()` are None and
the decoder runs on numpy alone. The library is cached under ~/.cache/lmforge/native (XDG_CACHE_HOME), named by a hash
of the source, the compiler and the CPU's flags, and written to a temporary name then renamed.
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
Gemv = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
Attend = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int], np.ndarray]


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


def _check(a: np.ndarray, what: str) -> None:
    if a.dtype != np.float32 or a.strides[-1] != 4:
        raise ValueError(f"{what} must be fp32 with a unit last stride, not {a.dtype} with strides {a.strides}")


@functools.cache
def gemv() -> Gemv | None:
    """`gemv(w, x, threads)`: w (rows, cols), x (cols,) -> a new (rows,) array W x; None where the kernels cannot be
    built (see the module doc)."""
    if (library := _library()) is None:
        return None
    kernel = library.lmforge_gemv

    def run(w: np.ndarray, x: np.ndarray, threads: int) -> np.ndarray:
        rows, cols = w.shape
        _check(w, "the weight")
        _check(x := np.ascontiguousarray(x), "the vector")  # a view such as qkv[:n] is contiguous already: no copy
        if x.shape != (cols,):
            raise ValueError(f"a ({rows}, {cols}) weight takes a ({cols},) vector, not {x.shape}")
        y = np.empty(rows, np.float32)
        kernel(w.ctypes.data, w.strides[0] // 4, x.ctypes.data, y.ctypes.data, rows, cols, threads)
        return y

    return run


@functools.cache
def attend() -> Attend | None:
    """`attend(q, keys, values, slopes, threads)`: q (Hq, D) rotated and scaled, keys and values (Hkv, S, D) views of
    the cache, slopes (Hq,) for ALiBi or None -> a new (Hq * D,) array, softmax(q k^T + bias) v per query head."""
    if (library := _library()) is None:
        return None
    kernel = library.lmforge_attend

    def run(q: np.ndarray, keys: np.ndarray, values: np.ndarray, slopes: np.ndarray | None, threads: int) -> np.ndarray:
        Hq, D = q.shape
        Hkv, S, _ = keys.shape
        for a, what in ((q, "q"), (keys, "the keys"), (values, "the values")):
            _check(a, what)
        if not q.flags.c_contiguous or keys.shape != values.shape or keys.shape[2] != D or Hq % Hkv:
            raise ValueError(
                f"attend needs a contiguous (Hq, D) q and (Hkv, S, D) keys and values: {q.shape}, "
                f"{keys.shape}, {values.shape}"
            )
        if slopes is not None and (
            slopes.dtype != np.float32 or slopes.shape != (Hq,) or not slopes.flags.c_contiguous
        ):
            raise ValueError(f"ALiBi slopes must be a contiguous ({Hq},) fp32 array")
        out = np.empty(Hq * D, np.float32)
        k_head, k_pos = keys.strides[0] // 4, keys.strides[1] // 4
        v_head, v_pos = values.strides[0] // 4, values.strides[1] // 4
        slopes_ptr = None if slopes is None else slopes.ctypes.data
        kernel(
            q.ctypes.data,
            keys.ctypes.data,
            k_head,
            k_pos,
            values.ctypes.data,
            v_head,
            v_pos,
            slopes_ptr,
            out.ctypes.data,
            Hq,
            Hkv,
            S,
            D,
            threads,
        )
        return out

    return run
