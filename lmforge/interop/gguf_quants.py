"""ggml's Q8_0 and Q4_0 blocks, written in numpy as ggml-quants.c's reference quantizers compute them, and which of a
llama model's tensors an export stores in which type.

A block holds 32 consecutive weights of a row: Q8_0 an fp16 scale d = absmax / 127 and 32 int8 codes round(w / d)
(34 bytes); Q4_0 an fp16 scale d = m / -8, m the weight of largest magnitude (signed), and 32 4-bit codes
min(15, trunc(w / d + 8.5)), weight j in the low nibble of byte j and weight j + 16 in its high nibble (18 bytes).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
TYPES = ("f32", "f16", "q8_0", "q4_0")


def _blocks(w: np.ndarray) -> np.ndarray:
    assert w.shape[-1] % BLOCK == 0, w.shape
    return np.ascontiguousarray(w, dtype=np.float32).reshape(-1, BLOCK)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's round takes them to even); floor(|x| + 0.5) would round
    0.49999997 up, as the sum rounds to 1 in float32."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(2 * (a - whole)))


def q8_0(w: np.ndarray) -> np.ndarray:
    """(..., n) float weights, n a multiple of 32 -> (..., n / 32 * 34) uint8 Q8_0 blocks."""
    blocks = _blocks(w)  # (N, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    codes = _round_away(blocks * _inverse(d)).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), codes.view(np.uint8)], axis=1)  # (N, 34)
    return out.reshape(*w.shape[:-1], -1)


def q4_0(w: np.ndarray) -> np.ndarray:
    """(..., n) float weights, n a multiple of 32 -> (..., n / 32 * 18) uint8 Q4_0 blocks."""
    blocks = _blocks(w)  # (N, 32)
    top = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)  # first largest magnitude
    d = top / np.float32(-8)
    codes = np.minimum(np.trunc(blocks * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    packed = codes[:, :16] | (codes[:, 16:] << 4)  # (N, 16)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)  # (N, 18)
    return out.reshape(*w.shape[:-1], -1)


def tensor_type(name: str, shape: tuple[int, ...], file_type: str, tied: bool) -> str:
    """The type one tensor is stored in, as llama.cpp's tools choose it: norms and other 1-D tensors stay f32 and rows
    not made of whole blocks fall back to f16 (convert_hf_to_gguf.py); in a q4_0 file the output head, and the
    embedding when it doubles as the head (tied), keep more bits (llama-quantize gives them Q6_K, which we do not
    write: q8_0); in a q8_0 file every matrix is q8_0, the embedding and head included, as convert_hf_to_gguf does."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or file_type == "f32":
        return "f32"
    if file_type in ("q8_0", "q4_0") and shape[-1] % BLOCK:
        return "f16"
    if file_type == "q4_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return "q8_0"
    return file_type


def encode(w: np.ndarray, kind: str) -> np.ndarray:
    """A float32 tensor in the given type: f32 and f16 as arrays of their dtype, q8_0 and q4_0 as bytes of blocks."""
    return {"f32": lambda a: a.astype(np.float32), "f16": lambda a: a.astype(np.float16), "q8_0": q8_0, "q4_0": q4_0}[
        kind
    ](w)
