"""Data: corpora as documents, the train/val split, and token shards with a resumable loader."""

from lmforge.data.corpus import DataConfig, Document, embedded_corpus, load_corpus, read_documents
from lmforge.data.shards import ShardLoader, eval_batches, read_manifest, shards_ready, write_shards

__all__ = [
    "DataConfig",
    "Document",
    "ShardLoader",
    "embedded_corpus",
    "eval_batches",
    "load_corpus",
    "read_documents",
    "read_manifest",
    "shards_ready",
    "write_shards",
]
