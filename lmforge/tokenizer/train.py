"""Train a byte-level BPE tokenizer on text files or a prepared data folder and write tokenizer.json.

Run: `lmforge tokenizer train INPUT --vocab-size 4096 --output runs/tokenizer`, where INPUT is a file or folder of
.txt, .jsonl or .parquet, or the output folder of `lmforge data prepare` (its train split, as filtered and scrubbed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.corpus import Document, read_documents
from lmforge.data.training_data import is_prepared, prepared_documents
from lmforge.errors import LmforgeError
from lmforge.tokenizer.bpe import BYTE_VOCAB_SIZE, Tokenizer, TokenizerConfig


def documents(path: str | Path) -> Iterator[Document]:
    """The training documents of INPUT: a prepared folder's train split, or every supported file's documents."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"input {path} does not exist; give a file or folder of text, or a prepared data folder")
    return prepared_documents(path) if is_prepared(path) else read_documents(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer and write tokenizer.json")
    p.add_argument("input", help="file or folder of .txt, .jsonl, .parquet (optionally .gz), or a prepared data folder")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokens in all, including 256 bytes and 7 specials")
    p.add_argument("--output", default="runs/tokenizer", help="folder for tokenizer.json and the transformers files")
    p.add_argument("--kind", choices=["bpe", "byte"], default="bpe", help="byte: the 263 byte tokens, no merges")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    p.add_argument("--max-train-bytes", type=int, default=20_000_000, help="train on at most this much text")


def command(args: argparse.Namespace) -> None:
    if args.kind == "bpe" and args.vocab_size < BYTE_VOCAB_SIZE:
        raise LmforgeError(f"--vocab-size={args.vocab_size} must be >= {BYTE_VOCAB_SIZE} (256 bytes + 7 specials)")
    cfg = TokenizerConfig(kind=args.kind, min_frequency=args.min_frequency, max_train_bytes=args.max_train_bytes)
    cfg.validate()
    vocab_size = BYTE_VOCAB_SIZE if args.kind == "byte" else args.vocab_size
    texts, seen = [], 0
    for doc in documents(args.input):
        if seen >= cfg.max_train_bytes:
            break
        texts.append(doc.text)
        seen += len(doc.text.encode())
    if not seen:
        raise LmforgeError(f"input {args.input} holds no text; add documents")
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train(texts, vocab_size, cfg)
    path = tokenizer.save(args.output)
    sample = "".join(texts)[:1_000_000]
    per_token = len(sample.encode()) / max(1, len(tokenizer.encode(sample)))
    print(
        f"trained on {min(seen, cfg.max_train_bytes):,} bytes of {len(texts):,} documents in "
        f"{time.perf_counter() - t0:.1f}s: {tokenizer.vocab_size} tokens, {per_token:.2f} bytes/token on that text"
    )
    print(f"tokenizer: {path} (sha256 {tokenizer.sha256[:16]})")
