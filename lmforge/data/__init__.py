"""Data: corpora as documents, the train/val split, and token shards with a resumable loader."""

from typing import Any

from lmforge.data.corpus import DataConfig, Document, embedded_corpus, load_corpus, read_documents

_SHARDS = ("ShardLoader", "eval_batches", "read_manifest", "shards_ready", "write_shards")

__all__ = ["DataConfig", "Document", "embedded_corpus", "load_corpus", "read_documents", *_SHARDS]


def __getattr__(name: str) -> Any:
    # shards.py imports torch (seconds); data-preparation workers import this package but never need it.
    if name in _SHARDS:
        from lmforge.data import shards

        return getattr(shards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
