"""Benchmark contamination by word n-gram overlap: 13-grams of lowercased, punctuation-free words shared between a
text and a task's items (GPT-3, Brown et al. 2020, appendix C; lm-eval's decontamination Janitor)."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

NGRAM = 13
TASK_FORMATS = (".jsonl", ".json", ".csv")
# lm-eval's Janitor: ASCII punctuation deleted, then words split on whitespace (we lowercase all of Unicode).
_DELETE = str.maketrans("", "", string.punctuation)
_MULTIPLIER = np.uint64(0x100000001B3)  # odd: a bijection mod 2**64, so n-grams one word apart never collide


def words(text: str) -> list[str]:
    return text.lower().translate(_DELETE).split()


def ngrams(text: str, n: int = NGRAM) -> list[tuple[str, ...]]:
    w = words(text)
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


@functools.lru_cache(maxsize=1 << 16)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def ngram_hashes(text: str, n: int = NGRAM) -> np.ndarray:
    """(len(words) - n + 1,) uint64 hashes of the text's word n-grams: a polynomial in the words' 64-bit blake2b
    hashes, computed a position at a time over the whole text."""
    w = words(text)
    if len(w) < n:
        return np.zeros(0, np.uint64)
    h = np.fromiter(map(_word_hash, w), np.uint64, len(w))
    out = np.zeros(len(w) - n + 1, np.uint64)
    for k in range(n):  # uint64 arithmetic wraps modulo 2**64, silently for arrays
        out = out * _MULTIPLIER + h[k : len(w) - n + 1 + k]
    return out


def build_index(texts: Iterable[str], n: int = NGRAM) -> set[int]:
    index: set[int] = set()
    for text in texts:
        index.update(ngram_hashes(text, n).tolist())
    return index


def overlapping(items: list[str], index: set[int], n: int = NGRAM) -> list[bool]:
    """Whether each item shares an n-gram with the index. Items of fewer than n words hold none, so never overlap."""
    return [not index.isdisjoint(ngram_hashes(item, n).tolist()) for item in items]


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def task_items(path: str | Path) -> list[str]:
    """A task file's items, each the text of all its string fields (question, choices, answer...), one per line of
    .jsonl, element of a .json list (or of the one list in a .json object), or row of a .csv."""
    path = Path(path)
    if path.suffix not in TASK_FORMATS:
        raise LmforgeError(f"task file {path} is not {', '.join(TASK_FORMATS)}; convert it to JSONL")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
            records: list[Any] = list(csv.DictReader(io.StringIO(text)))
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            lists = [v for v in data.values() if isinstance(v, list)] if isinstance(data, dict) else [data]
            if len(lists) != 1 or not isinstance(lists[0], list):
                raise ValueError("expected a list of items, or an object holding one list")
            records = lists[0]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LmforgeError(f"task file {path} cannot be read ({e}); give UTF-8 JSONL, JSON or CSV items") from None
    return ["\n".join(_strings(r)) for r in records]


@functools.cache
def task_indexes(paths: tuple[str, ...], n: int = NGRAM) -> tuple[tuple[str, frozenset[int]], ...]:
    """(path, n-gram index of its items) per task file, built once per process."""
    return tuple((p, frozenset(build_index(task_items(p), n))) for p in paths)


def overlap_reason(text: str, indexes: tuple[tuple[str, frozenset[int]], ...], n: int = NGRAM) -> str | None:
    """ "overlaps:<task file>" for the first task file sharing an n-gram with `text`, else None."""
    hashes = ngram_hashes(text, n).tolist()
    return next((f"overlaps:{path}" for path, index in indexes if not index.isdisjoint(hashes)), None)
