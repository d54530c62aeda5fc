"""The C kernels of CPU decode (decode_kernels.c), compiled on first use with the machine's C compiler and loaded with
ctypes: matrix products for one token row (matvec, over nn.Linear's row-major weight) and for many (matmul, over a copy
packed in panels of columns), attention of a step's new tokens over a paged KV cache, SwiGLU's product and RMSNorm,
and all the layers of a Llama-style decoder in one call (layers). Integer weights (QuantLinear's int8 and int4 codes,
`Quantized`) have products of their own (qmatvec, qmatmul, and in layers) that read the codes, never a float copy.

Why: at decode's shapes torch and numpy run these poorly. OpenBLAS runs a matrix-vector product on one thread below
~460k weights, and torch's MKL multiplies 4-32 token rows by a weight at 10-50 GFLOP/s; the C kernels split every
weight over torch's thread count (batch-1 decode at 77-87% of the memory-bandwidth roofline) and stream packed panels
of the weights past tiles of 6 token rows (~170-190 GFLOP/s at 16-32 rows, ~200 at 256 on 2 cores, the FMA units'
peak). Integer codes cut the bytes batch-1 decode reads by 4x (int8) or 8x (int4); with AVX-512 VNNI their products
round the activations to int8 in blocks of 32, as llama.cpp's Q8_0 does, and sum 64 products an instruction (see
rounds_activations). The attention kernel does in one call per layer (RoPE, the cache writes, causal attention over
each sequence's blocks where they lie) what takes torch a gather and a padded SDPA per step. `layers` runs them all
for a step from one call: ~8% of a 32-request serving run went to Python between the kernels.

Where no C compiler with OpenMP is found, compilation fails, or LMFORGE_NATIVE=0, `available()` is False, every
factory here gives None, and the decoder runs on numpy alone (batch-1 steps; the engine's many-row steps run in torch).
The library is cached under ~/.cache/lmforge/native (XDG_CACHE_HOME), named by a hash of the source, the compiler and
the CPU's flags, written to a temporary name and renamed.
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
    p, i, n, ref = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.POINTER
    library.lmforge_gemv.argtypes = [p, n, p, p, i, i, i]
    library.lmforge_gemm.argtypes = [p, n, p, p, n, i, i, i, i]
    library.lmforge_panel_width.restype = i
    library.lmforge_vnni.restype = i
    library.lmforge_vnni_panels.argtypes = [i, i]
    library.lmforge_vnni_panels.restype = i
    library.lmforge_attention.argtypes = [p, n, ref(KVPool), ref(_ChunksArg), ref(_Heads), p, n, i]
    library.lmforge_layers.argtypes = [p, i, ref(_Stack), ref(KVPool), ref(_ChunksArg), p, i]
    library.lmforge_qgemv.argtypes = [ref(_Matrix), p, p, i, i, i]
    library.lmforge_qgemm.argtypes = [p, n, ref(_Matrix), p, n, i, i, i, i]
    library.lmforge_silu_mul.argtypes = [p, n, p, n, i, i, i]
    library.lmforge_rmsnorm.argtypes = [p, n, p, p, n, i, i, ctypes.c_float, i]
    for kernel in ("gemv", "gemm", "qgemv", "qgemm", "attention", "silu_mul", "rmsnorm", "layers"):
        getattr(library, f"lmforge_{kernel}").restype = None
    return library


def available() -> bool:
    """Whether the kernels are built and loaded (see the module doc for when they are not)."""
    return _library() is not None


def _check(a: np.ndarray, what: str) -> None:
    if a.dtype != np.float32 or a.strides[-1] != 4:
        raise ValueError(f"{what} must be fp32 with a unit last stride, not {a.dtype} with strides {a.strides}")


def _rows(a: np.ndarray, width: int, what: str) -> tuple[np.ndarray, int, int]:
    """(a with unit column stride, its rows, its row stride in floats) for a (rows, width) matrix or a (width,) vector,
    which is one row. The checks come first and cheap: batch-1 decode calls this ~30 times a token."""
    if a.dtype == np.float32 and a.shape[-1:] == (width,) and a.strides[-1] == 4:
        if a.ndim == 1:
            return a, 1, width
        if a.ndim == 2 and a.strides[0] % 4 == 0:
            return a, a.shape[0], a.strides[0] // 4
    if a.dtype != np.float32 or a.shape[-1:] != (width,) or a.ndim > 2:
        raise ValueError(f"{what} must be fp32 of shape (rows, {width}) or ({width},), not {a.dtype} {a.shape}")
    return _rows(np.ascontiguousarray(a), width, what)


class _Outputs:
    """Where a kernel writes: a new array per call, or (reuse) the first rows of one buffer, which every call
    overwrites and which grows to the most rows asked for. Its address is then taken once (numpy's `.ctypes.data`
    costs ~1.7 us, a few percent of a batch-1 decode step), and an engine step whose row count differs from the last
    does not map fresh pages (a 512-token prompt step would fault in ~70 MB of them)."""

    def __init__(self, width: int, reuse: bool):
        self.width, self.reuse, self.buffer, self.address = width, reuse, np.empty((0, width), np.float32), 0

    def __call__(self, rows: int, vector: bool) -> tuple[np.ndarray, int]:
        if not self.reuse:
            y = np.empty((self.width,) if vector else (rows, self.width), np.float32)
            return y, y.ctypes.data
        if rows > len(self.buffer):
            self.buffer = np.empty((rows, self.width), np.float32)
            self.address = self.buffer.ctypes.data
        return (self.buffer[0] if vector else self.buffer[:rows]), self.address


def matvec(w: np.ndarray, threads: int, reuse_output: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """x (cols,) -> W x (rows,) for a fixed row-major fp32 weight w (rows, cols) on `threads` threads; None without
    the kernels. The fastest batch-1 product: every thread reads a contiguous block of W. reuse_output as for matmul."""
    if (library := _library()) is None:
        return None
    _check(w, "the weight")
    kernel, (rows, cols), address, row_stride = library.lmforge_gemv, w.shape, w.ctypes.data, w.strides[0] // 4
    output = _Outputs(rows, reuse_output)

    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or x.shape != (cols,):
            raise ValueError(f"a ({rows}, {cols}) weight takes a ({cols},) fp32 vector, not {x.dtype} {x.shape}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        y, y_address = output(1, True)
        kernel(address, row_stride, x.ctypes.data, y_address, rows, cols, threads)
        return y

    run.weight = w  # keeps the weight alive as long as its address is used
    return run


def pack_panels(w_t: np.ndarray, width: int) -> np.ndarray:
    """(K, N) -> (panels, K, width): each `width` columns of w_t as one contiguous block, the last padded with zeros."""
    K, N = w_t.shape
    panels = -(-N // width)
    w = w_t.T  # (N, K): nn.Linear's own row-major weight when w_t is its transposed view, read in order
    if panels * width != N:
        w = np.concatenate([w, np.zeros((panels * width - N, K), np.float32)])
    # one transposing copy (a loop of strided column slices took 4 s for SmolLM2's weights, this 0.5 s)
    return np.ascontiguousarray(w.reshape(panels, width, K).transpose(0, 2, 1))


def matmul(w_t: np.ndarray, threads: int, reuse_output: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """x (M, K) or (K,) -> x @ w_t (M, N) or (N,) for a fixed fp32 w_t (K, N) (an nn.Linear weight, transposed), on
    `threads` threads; None without the kernels. The kernel reads a copy of w_t packed in panels of columns (see
    lmforge_gemm), which this makes. reuse_output: every product is written to one array, valid until the next call."""
    if (library := _library()) is None:
        return None
    if w_t.dtype != np.float32 or w_t.ndim != 2:
        raise ValueError(f"the transposed weight must be a fp32 matrix, not {w_t.dtype} {w_t.shape}")
    (K, N), packed = w_t.shape, pack_panels(w_t, library.lmforge_panel_width())
    kernel, address, output = library.lmforge_gemm, packed.ctypes.data, _Outputs(N, reuse_output)

    def run(x: np.ndarray) -> np.ndarray:
        x, rows, x_stride = _rows(x, K, f"the input of a ({K}, {N}) matmul")
        y, y_address = output(rows, x.ndim == 1)
        kernel(x.ctypes.data, x_stride, address, y_address, N, rows, K, N, threads)
        return y

    run.weight = packed  # keeps the weights alive as long as their address is used
    return run


class Quantized(NamedTuple):
    """An integer weight W (out, in) as QuantLinear keeps it: w = (code - zero) * scale per group of group_size input
    columns. codes (out, in * bits / 8) uint8 (int4: column 2j in the low nibble of byte j, 2j + 1 in the high one);
    scales and zeros (out, in / group_size) fp32."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // self.bits

    def check(self) -> Quantized:
        (N, K), groups = self.shape, self.scales.shape[-1]
        if self.bits not in (4, 8) or self.codes.dtype != np.uint8 or not self.codes.flags.c_contiguous:
            raise ValueError(f"codes must be C-contiguous uint8 of 4 or 8 bits, not {self.codes.dtype} {self.bits}")
        for name in ("scales", "zeros"):
            a = getattr(self, name)
            if (
                a.dtype != np.float32
                or a.shape != (N, groups)
                or not a.flags.c_contiguous
                or groups * self.group_size != K
            ):
                raise ValueError(f"{name} must be C-contiguous fp32 ({N}, {K} / {self.group_size}), not {a.shape}")
        return self


class _Matrix(ctypes.Structure):
    """lmforge_matrix: a linear layer's weight, fp32 (bits 32) or integer codes, in rows or in panels."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("bits", ctypes.c_int),
        ("group_size", ctypes.c_int),
    ]


def _matrix(arrays: tuple[np.ndarray, ...], bits: int, group_size: int) -> _Matrix:
    data, scales, zeros = (a.ctypes.data if a is not None else None for a in arrays)
    return _Matrix(data, scales, zeros, bits, group_size)


def pack_quantized(q: Quantized, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codes of q in panels of `width` columns of W^T, as lmforge_qgemm reads them, with their scales and a second
    per-column table (panels, groups, width), zero right of the last column. With VNNI panels (lmforge_vnni_panels):
    per 4 rows of W^T, each 16 columns' 4 codes side by side (int8 (panels, K / 4, width, 4); int4 (panels, K / 4, 2,
    64) bytes, vectors 2h and 2h + 1 in the low and high nibbles of 64 bytes h) and scale x zero. Else (float panels):
    int8 (panels, K, width), int4 (panels, K, width / 2) bytes (column j in the low nibble of byte j, column j + width /
    2 in its high one), and offsets -zero x scale. The same bytes as q's codes: a quantized copy for many-row products,
    as `matmul` keeps one for fp32."""
    (N, K), panels = q.shape, -(-q.shape[0] // width)
    pad = panels * width - N
    codes = q.codes if q.bits == 8 else np.stack([q.codes & 15, q.codes >> 4], axis=-1).reshape(N, K)
    codes = np.concatenate([codes, np.zeros((pad, K), np.uint8)]).reshape(panels, width, K)
    vnni = _library().lmforge_vnni_panels(K, q.group_size)
    if vnni:
        codes = codes.reshape(panels, width, K // 4, 4).transpose(0, 2, 1, 3)  # (panels, K / 4, width, 4)
        if q.bits == 4:
            vectors = codes.reshape(panels, K // 4, 2, 2, 64)  # (.., h, low/high, 16 columns x 4)
            codes = vectors[:, :, :, 0] | (vectors[:, :, :, 1] << 4)
    else:
        codes = codes.transpose(0, 2, 1)  # (panels, K, width)
        if q.bits == 4:
            codes = codes[..., : width // 2] | (codes[..., width // 2 :] << 4)

    def per_panel(a: np.ndarray) -> np.ndarray:  # (N, groups) -> (panels, groups, width)
        a = np.concatenate([a, np.zeros((pad, a.shape[1]), np.float32)])
        return np.ascontiguousarray(a.reshape(panels, width, -1).transpose(0, 2, 1))

    second = q.zeros * q.scales if vnni else -q.zeros * q.scales
    return np.ascontiguousarray(codes), per_panel(q.scales), per_panel(second)


def rounds_activations(q: Quantized, rows: int) -> bool:
    """Whether a product of `rows` rows with q rounds them to int8 in blocks of 32 (llama.cpp's Q8_0 activations,
    ~0.5-1% of the product's size): with AVX-512 VNNI, for groups of 32 columns or a multiple; qmatvec (one row) where
    64 divides the columns, qmatmul where 32 does (lmforge_vnni_panels). The fp32 kernels never do."""
    if not available() or not _library().lmforge_vnni():
        return False
    K = q.shape[1]
    return (
        q.group_size % 32 == 0 and K % 64 == 0 if rows == 1 else bool(_library().lmforge_vnni_panels(K, q.group_size))
    )


def qmatvec(q: Quantized, threads: int, reuse_output: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """x (in,) -> W x (out,) for an integer weight, reading its codes where they are (lmforge_qgemv; see
    rounds_activations); None without the kernels. reuse_output as for matmul."""
    if (library := _library()) is None:
        return None
    (rows, cols), matrix = q.check().shape, _matrix(q[:3], q.bits, q.group_size)
    kernel, output = library.lmforge_qgemv, _Outputs(rows, reuse_output)

    def run(x: np.ndarray) -> np.ndarray:
        if x.dtype != np.float32 or x.shape != (cols,):
            raise ValueError(f"a ({rows}, {cols}) weight takes a ({cols},) fp32 vector, not {x.dtype} {x.shape}")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        y, y_address = output(1, True)
        kernel(matrix, x.ctypes.data, y_address, rows, cols, threads)
        return y

    run.weight = q  # keeps the codes alive as long as their address is used
    return run


def qmatmul(q: Quantized, threads: int, reuse_output: bool = False) -> Callable[[np.ndarray], np.ndarray] | None:
    """x (M, in) or (in,) -> x W^T (M, out) or (out,) for an integer weight, through a copy of its codes in panels
    (pack_quantized; lmforge_qgemm); None without the kernels. reuse_output as for matmul."""
    if (library := _library()) is None:
        return None
    (N, K), packed = q.check().shape, pack_quantized(q, library.lmforge_panel_width())
    kernel, matrix, output = library.lmforge_qgemm, _matrix(packed, q.bits, q.group_size), _Outputs(N, reuse_output)

    def run(x: np.ndarray) -> np.ndarray:
        x, rows, x_stride = _rows(x, K, f"the input of a ({N}, {K}) integer matmul")
        y, y_address = output(rows, x.ndim == 1)
        kernel(x.ctypes.data, x_stride, matrix, y_address, N, rows, K, N, threads)
        return y

    run.weight = packed  # keeps the codes alive as long as their address is used
    return run


def silu_mul(hidden: int, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """gu (rows, 2 H) or (2 H,), the gate's H columns then the up projection's -> silu(gate) * up, (rows, H) or (H,),
    written to one reused buffer, valid until the next call; None without the kernels."""
    if (library := _library()) is None:
        return None
    kernel, output = library.lmforge_silu_mul, _Outputs(hidden, reuse=True)

    def run(gu: np.ndarray) -> np.ndarray:
        gu, rows, gu_stride = _rows(gu, 2 * hidden, "SwiGLU's gate and up")
        y, y_address = output(rows, gu.ndim == 1)
        kernel(gu.ctypes.data, gu_stride, y_address, hidden, rows, hidden, threads)
        return y

    return run


def rmsnorm(weight: np.ndarray, eps: float, threads: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """x (rows, C) or (C,) -> x / sqrt(mean(x^2) + eps) * weight, written to one reused buffer, valid until the next
    call; None without the kernels."""
    if (library := _library()) is None:
        return None
    weight = np.ascontiguousarray(weight, np.float32)
    (C,) = weight.shape
    kernel, address, output = library.lmforge_rmsnorm, weight.ctypes.data, _Outputs(C, reuse=True)

    def run(x: np.ndarray) -> np.ndarray:
        x, rows, x_stride = _rows(x, C, "RMSNorm's input")
        y, y_address = output(rows, x.ndim == 1)
        kernel(x.ctypes.data, x_stride, address, y_address, C, rows, C, eps, threads)
        return y

    run.weight = weight  # keeps the weight alive as long as its address is used
    return run


class KVPool(ctypes.Structure):
    """Where one layer's keys and values live, for the attention kernel (lmforge_pool): the vector of kv head g at
    position s of the sequence whose block table is `table` starts at address + 4 * (g * head_stride +
    table[s // block_size] * block_stride + (s % block_size) * head_dim). The owner keeps the arrays alive."""

    _fields_ = [
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("head_stride", ctypes.c_long),
        ("block_stride", ctypes.c_long),
        ("block_size", ctypes.c_int),
    ]


class _ChunksArg(ctypes.Structure):
    """lmforge_chunks: a step's chunks for the kernels (see Chunks)."""

    _fields_ = [
        ("tables", ctypes.c_void_p),
        ("width", ctypes.c_int),
        ("first", ctypes.c_void_p),
        ("ends", ctypes.c_void_p),
        ("count", ctypes.c_int),
    ]


class _Heads(ctypes.Structure):
    """lmforge_heads: the attention's heads, RoPE's tables and ALiBi's slopes (NULL where unused), the score scale."""

    _fields_ = [
        ("n_heads", ctypes.c_int),
        ("n_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("slopes", ctypes.c_void_p),
        ("scale", ctypes.c_float),
    ]


class _Stack(ctypes.Structure):
    """lmforge_stack: a Llama-style decoder's layers for lmforge_layers."""

    _fields_ = [
        ("n_layers", ctypes.c_int),
        ("dim", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("norms", ctypes.c_void_p),
        ("matrices", ctypes.c_void_p),
        ("packed", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("heads", _Heads),
    ]


def pools(k: np.ndarray, v: np.ndarray) -> list[KVPool]:
    """Per layer, where the attention kernel finds k and v: (layers, Hkv, max_len, D) arrays (one block of max_len
    positions: tables are [[0]]) or (layers, Hkv, blocks, block_size, D) pools. The caller keeps both alive."""
    if k.shape != v.shape or k.strides != v.strides or k.dtype != np.float32 or k.ndim not in (4, 5):
        raise ValueError(f"k and v must be alike fp32 caches of 4 or 5 dims, not {k.dtype} {k.shape} / {v.shape}")
    if k.strides[-1] != 4 or k.strides[-2] != 4 * k.shape[-1]:
        raise ValueError("the positions of a block must lie one after another, each a contiguous vector")
    block_size = k.shape[-2]
    head, block = k.strides[1] // 4, (k.strides[2] // 4 if k.ndim == 5 else 0)
    keys, values = k.ctypes.data, v.ctypes.data
    return [
        KVPool(keys + offset, values + offset, head, block, block_size)
        for offset in range(0, k.shape[0] * k.strides[0], k.strides[0])
    ]


class Chunks:
    """A step's new tokens for the attention kernel: chunk b is `counts[b]` rows (in order, chunk after chunk), the last
    tokens of a sequence of `ends[b]` tokens whose block table is `tables[b]`. Built once per step, read by every
    layer; batch-1 decode keeps one and moves its end (`advance_to`)."""

    def __init__(self, tables: list[list[int]], ends: list[int], counts: list[int], block_size: int):
        width = max(len(t) for t in tables)
        self.capacity = [len(t) * block_size for t in tables]
        for capacity, end, count in zip(self.capacity, ends, counts, strict=True):
            self._check(count, end, capacity)
        self.tables = np.array([t + [0] * (width - len(t)) for t in tables], np.int32)  # (B, width)
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)  # (B + 1,)
        self.ends = np.array(ends, np.int32)
        self.rows, self.width, self.block_size, self.longest = int(self.first[-1]), width, block_size, max(ends)
        self.arg = _ChunksArg(self.tables.ctypes.data, width, self.first.ctypes.data, self.ends.ctypes.data, len(ends))

    @staticmethod
    def _check(count: int, end: int, capacity: int) -> None:
        if not 0 < count <= end <= capacity:
            raise ValueError(f"a chunk of {count} tokens ending at {end} does not fit a table of {capacity} positions")

    def advance_to(self, end: int) -> None:
        """One chunk of one token: now the token at position end - 1."""
        self._check(1, end, self.capacity[0])
        self.ends[0] = self.longest = end


def attention(
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    slopes: np.ndarray | None,
    rope: tuple[np.ndarray, np.ndarray] | None,
    threads: int,
    reuse_output: bool = False,
) -> Callable[..., np.ndarray] | None:
    """(qkv, pool, chunks[, out]) -> the new tokens' attention outputs (rows, n_heads * head_dim), or (Hq D,) for a
    vector qkv; None without the kernels. qkv: their (rows, (Hq + 2 Hkv) D) projections, not yet rotated; pool: this
    layer's cache, where their k and v are written and every position up to each query is read; chunks: which rows
    belong to which sequence (see Chunks); out: a (rows, Hq D) fp32 array with unit column stride to write to
    instead. slopes: ALiBi's (Hq,) slopes, or None. rope: RoPE's (positions, D) cos and sin tables, or None.
    reuse_output as for matmul."""
    if (library := _library()) is None:
        return None
    Hq, Hkv, D = n_heads, n_kv_heads, head_dim
    where = _HeadsAndPositions(Hq, Hkv, D, slopes, rope)
    kernel, output, width, heads = library.lmforge_attention, _Outputs(Hq * D, reuse_output), where.width, where.arg

    def run(qkv: np.ndarray, pool: KVPool, chunks: Chunks, out: np.ndarray | None = None) -> np.ndarray:
        qkv, rows, qkv_stride = _rows(qkv, width, "qkv")
        where.check(rows, pool, chunks)
        if out is None:
            out, out_address = output(rows, qkv.ndim == 1)
        else:
            if out.dtype != np.float32 or out.shape != (rows, Hq * D) or out.strides[1] != 4:
                raise ValueError(f"attention writes a ({rows}, {Hq * D}) fp32 out, not {out.dtype} {out.shape}")
            out_address = out.ctypes.data
        out_stride = Hq * D if out.ndim == 1 else out.strides[0] // 4
        kernel(qkv.ctypes.data, qkv_stride, pool, chunks.arg, heads, out_address, out_stride, threads)
        return out

    run.keep = where  # alive as long as its addresses are used
    return run


class _HeadsAndPositions:
    """The heads and the position information of the attention kernel: ALiBi's (Hq,) slopes and RoPE's (positions, D)
    cos and sin tables (either or both None), checked, with their addresses."""

    def __init__(self, Hq: int, Hkv: int, D: int, slopes: np.ndarray | None, rope: tuple | None):
        if Hq % Hkv or D % 2:
            raise ValueError(f"{Hq} query heads of {D} cannot share {Hkv} kv heads evenly with an even head size")
        self.width = (Hq + 2 * Hkv) * D  # a row of qkv
        self.slopes = self.cos = self.sin = self.limit = None
        if slopes is not None:
            if slopes.dtype != np.float32 or slopes.shape != (Hq,):
                raise ValueError(f"ALiBi slopes must be a ({Hq},) fp32 array, not {slopes.dtype} {slopes.shape}")
            self.keep_slopes = np.ascontiguousarray(slopes)
            self.slopes = self.keep_slopes.ctypes.data
        if rope is not None:
            self.keep_rope = tuple(np.ascontiguousarray(t, np.float32) for t in rope)
            cos, sin = self.keep_rope
            if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[1] != D:
                raise ValueError(
                    f"RoPE's cos and sin must be two (positions, {D}) tables, not {[cos.shape, sin.shape]}"
                )
            self.cos, self.sin, self.limit = cos.ctypes.data, sin.ctypes.data, len(cos)
        self.arg = _Heads(Hq, Hkv, D, self.cos, self.sin, self.slopes, 1.0 / math.sqrt(D))

    def check(self, rows: int, pool: KVPool, chunks: Chunks) -> None:
        if rows != chunks.rows:
            raise ValueError(f"qkv has {rows} rows for chunks of {chunks.rows} tokens")
        if pool.block_size != chunks.block_size:
            raise ValueError(f"the chunks count blocks of {chunks.block_size}, the pool's are {pool.block_size}")
        if self.limit is not None and chunks.longest > self.limit:
            raise ValueError(f"a position past RoPE's table of {self.limit}")


class LayerWeights(NamedTuple):
    """A Llama-style decoder layer for `layers`: the norms' (C,) weights and the linear layers' weights, fp32 W (out,
    in) arrays or Quantized."""

    attn_norm: np.ndarray
    qkv: np.ndarray | Quantized
    proj: np.ndarray | Quantized
    mlp_norm: np.ndarray
    gate_up: np.ndarray | Quantized
    down: np.ndarray | Quantized


def layers(
    weights: list[LayerWeights],
    eps: float,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    slopes: np.ndarray | None,
    rope: tuple[np.ndarray, np.ndarray] | None,
    threads: int,
    packed: bool = True,
) -> Callable[[np.ndarray, list[KVPool], Chunks], None] | None:
    """(x, pools, chunks) -> None: every layer of a Llama-style decoder (RMSNorm, SwiGLU's gate then up in one
    projection, no biases) applied in place to x, the (rows, C) fp32 hidden states of a step's new tokens, in one
    kernel call; pools: every layer's (see `pools`); chunks, slopes and rope as for `attention`. packed: keep the
    linear weights packed as `matmul` (fp32) and `qmatmul` (Quantized) do, for any number of rows; else read them where
    they are, in rows, through `matvec`'s and `qmatvec`'s products, for one row at a time (batch-1 decode, no copy).
    None without the kernels."""
    if (library := _library()) is None:
        return None
    Hq, Hkv, D = n_heads, n_kv_heads, head_dim
    where = _HeadsAndPositions(Hq, Hkv, D, slopes, rope)
    C, H = len(weights[0].attn_norm), weights[0].down.shape[1]
    shapes = LayerWeights((C,), (where.width, C), (C, Hq * D), (C,), (2 * H, C), (C, H))
    width = library.lmforge_panel_width()
    kept, norms, matrices = [], [], []
    for layer in weights:
        for name, array, shape in zip(LayerWeights._fields, layer, shapes, strict=True):
            if isinstance(array, Quantized):
                if array.check().shape != shape:
                    raise ValueError(f"a layer's {name} weight must be {shape}, not {array.shape}")
                arrays = pack_quantized(array, width) if packed else array[:3]
                kept.append(arrays)
                matrices.append(_matrix(arrays, array.bits, array.group_size))
                continue
            if array.dtype != np.float32 or array.shape != shape:
                raise ValueError(f"a layer's {name} weight must be fp32 {shape}, not {array.dtype} {array.shape}")
            array = pack_panels(array.T, width) if packed and array.ndim == 2 else np.ascontiguousarray(array)
            kept.append(array)
            if array.ndim == 1:
                norms.append(array.ctypes.data)
            else:
                matrices.append(_Matrix(array.ctypes.data, None, None, 32, 0))
    norm_addresses = (ctypes.c_void_p * len(norms))(*norms)
    matrix_array = (_Matrix * len(matrices))(*matrices)
    per_row = C + where.width + Hq * D + 3 * H
    stack = _Stack(
        len(weights), C, H, ctypes.addressof(norm_addresses), ctypes.addressof(matrix_array), packed, eps, where.arg
    )
    kernel, scratch, caches = library.lmforge_layers, np.empty(0, np.float32), (None, None)

    def run(x: np.ndarray, pools: list[KVPool], chunks: Chunks) -> None:
        nonlocal scratch, caches
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != C or not x.flags.c_contiguous:
            raise ValueError(
                f"the hidden states must be a C-contiguous fp32 (rows, {C}) array, not {x.dtype} {x.shape}"
            )
        if caches[0] is not pools:  # a ctypes array of the pools' addresses, made once per list of pools
            if len(pools) != len(weights) or len({(p.head_stride, p.block_stride, p.block_size) for p in pools}) != 1:
                raise ValueError(f"{len(weights)} layers need as many pools of one layout, not {len(pools)}")
            caches = (pools, (KVPool * len(pools))(*pools))
        if not packed and len(x) != 1:
            raise ValueError(f"layers over row-major weights take one row at a time, not {len(x)}")
        where.check(len(x), pools[0], chunks)
        if len(scratch) < len(x) * per_row:
            scratch = np.empty(len(x) * per_row, np.float32)
        kernel(x.ctypes.data, len(x), stack, caches[1], chunks.arg, scratch.ctypes.data, threads)

    run.keep = (kept, norm_addresses, matrix_array, where)  # alive as long as their addresses are used
    return run
