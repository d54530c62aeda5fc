"""Which evaluation items a run saw in training: word 13-gram overlap between the run's training documents (decoded
from its token shards) and each task's items (GPT-3, Brown et al. 2020, appendix C)."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.data.decontaminate import NGRAM, build_index, ngram_hashes, ngrams, overlapping, task_items
from lmforge.errors import LmforgeError
from lmforge.run import atomic_write
from lmforge.tokenizer import Tokenizer

__all__ = [
    "NGRAM",
    "build_index",
    "contamination",
    "count_overlapping",
    "ngrams",
    "overlapping",
    "run_contamination",
    "task_items",
    "training_ngrams",
    "training_texts",
]


def training_texts(run: str | Path) -> Iterator[str]:
    """The run's training documents as it saw them: data/train's shards (bos, text, eos per document, documents
    running across shard boundaries) decoded with the run's tokenizer.json. For a run on a `lmforge data prepare`
    output these are the prepared, filtered and scrubbed documents."""
    from lmforge.data.shards import shard_arrays  # torch: only where shards are read

    run = Path(run)
    if not (run / "tokenizer.json").is_file() or not (run / "data/train").is_dir():
        raise LmforgeError(f"{run} holds no tokenizer.json and data/train shards; give a pre-training run folder")
    tok = Tokenizer.load(run / "tokenizer.json")
    carry = np.zeros(0, dtype=np.int64)

    def text(ids: np.ndarray) -> str:
        return tok.decode((ids[1:-1] if len(ids) and ids[-1] == tok.eos_id else ids[1:]).tolist())

    for array in shard_arrays(run / "data/train"):
        tokens = np.concatenate([carry, np.asarray(array, dtype=np.int64)])
        starts = np.flatnonzero(tokens == tok.bos_id)
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            yield text(tokens[a:b])
        carry = tokens[starts[-1] :] if len(starts) else tokens
    if len(carry):
        yield text(carry)


def contamination(training: Iterable[str], tasks: dict[str, list[str]], n: int = NGRAM) -> dict[str, list[bool]]:
    """For each task, whether each item shares a word n-gram with any training text. Only the tasks' n-grams are
    held in memory; the training texts stream past them once."""
    index = build_index((item for items in tasks.values() for item in items), n)
    seen: set[int] = set()
    for text in training:
        seen |= index.intersection(ngram_hashes(text, n).tolist())
    return {name: overlapping(items, seen, n) for name, items in tasks.items()}


def run_contamination(run: str | Path, tasks: dict[str, list[str]], n: int = NGRAM) -> dict[str, dict[str, float]]:
    """Per task: items, items overlapping the run's training data, and their share."""
    flags = contamination(training_texts(run), tasks, n)
    return {
        name: {"items": len(f), "overlapping": sum(f), "rate": sum(f) / len(f) if f else 0.0}
        for name, f in flags.items()
    }


def training_ngrams(run: str | Path) -> np.ndarray:
    """Sorted distinct hashes of every word n-gram of the run's training documents, built once and cached in
    RUN/eval/train_ngrams.npy (8 bytes an n-gram; rebuilt when the training shards are newer)."""
    run = Path(run)
    cache, manifest = run / "eval" / "train_ngrams.npy", run / "data" / "train" / "manifest.json"
    if cache.is_file() and manifest.is_file() and cache.stat().st_mtime >= manifest.stat().st_mtime:
        return np.load(cache)
    parts = [ngram_hashes(text) for text in training_texts(run)]
    index = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    buffer = io.BytesIO()
    np.save(buffer, index)
    atomic_write(cache, buffer.getvalue())
    return index


def count_overlapping(items: list[str], index: np.ndarray, n: int = NGRAM) -> int:
    """How many items share a word n-gram with a sorted array of n-gram hashes (training_ngrams)."""
    if not len(index):
        return 0
    count = 0
    for item in items:
        hashes = ngram_hashes(item, n)
        at = np.searchsorted(index, hashes).clip(max=len(index) - 1)
        count += bool((index[at] == hashes).any())
    return count
