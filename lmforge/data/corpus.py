"""Text corpora as documents: the embedded default (this Python's own standard library) or the user's files, split
into train and validation by a hash of each document's id."""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import check
from lmforge.errors import LmforgeError

FORMATS = (".txt", ".jsonl", ".parquet")
FORMATS_HELP = ".txt, .jsonl (a 'text' field per line), .parquet (a 'text' column), each optionally .gz"
# Not prose or idiomatic code: third-party packages, test suites, the IDE and generated codec tables.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "encodings", "__pycache__"}


@dataclass
class DataConfig:
    path: str = ""
    """Training text: "" for the embedded corpus (this Python's standard library), a folder or a file of .txt, .jsonl
    (a "text" field), .parquet (a "text" column), each optionally .gz, or the output folder of `lmforge data prepare`
    (its tokenizer and shards are used as they are; val_fraction, max_bytes and tokenizer.* then do not apply)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by a hash of the document id."""
    max_bytes: int = 0
    """Stop reading after this many bytes of text; 0 reads everything."""
    canaries: int = 0
    """Random "secret numbers" planted in the training split (not val) to measure memorisation, recorded with as
    many never-planted controls in RUN/canaries.json for `lmforge eval RUN --task canary` (data/canaries.py)."""
    canary_repeats: int = 10
    """Times each canary is inserted, as a document of its own."""

    def validate(self) -> None:
        check(self.canaries >= 0, f"data.canaries={self.canaries} must be >= 0 (0 plants none)")
        check(self.canary_repeats >= 1, f"data.canary_repeats={self.canary_repeats} must be >= 1")
        check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        check(self.max_bytes >= 0, f"data.max_bytes={self.max_bytes} must be >= 0 (0 reads everything)")
        check(
            not self.path or Path(self.path).exists(),
            f"data.path={self.path!r} does not exist; give a folder or file of {FORMATS_HELP}, a `lmforge data "
            'prepare` output, or "" for the embedded corpus',
        )


@dataclass
class Document:
    id: str
    text: str


def embedded_corpus() -> Iterator[Document]:
    """This interpreter's standard library sources, then the pydoc topics (English prose), in a fixed order."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        rel
        for rel in (p.relative_to(stdlib) for p in stdlib.rglob("*.py"))
        if not _SKIP_DIRS.intersection(rel.parts[:-1]) and rel.as_posix() != "pydoc_data/topics.py"
    )
    for rel in files:
        yield Document(rel.as_posix(), (stdlib / rel).read_bytes().decode("utf-8", errors="replace"))
    for key in sorted(topics):
        yield Document(f"pydoc_data/topics/{key}", topics[key])


def read_documents(path: str | Path) -> Iterator[Document]:
    """Documents of a file or of every supported file under a folder (sorted); ids are paths (and line or row)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format(p))
        if not files:
            what = "is empty" if not any(path.iterdir()) else "holds no supported files"
            raise LmforgeError(f"data folder {path} {what}; add files of {FORMATS_HELP}")
        root = path
    elif path.is_file():
        if not _format(path):
            raise LmforgeError(f"data file {path} has an unsupported format; use {FORMATS_HELP}")
        files, root = [path], path.parent
    else:
        raise LmforgeError(f"data path {path} does not exist; give a folder or file of {FORMATS_HELP}")
    for file in files:
        yield from _READERS[_format(file)](file, file.relative_to(root).as_posix())


def _format(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    return next((ext for ext in FORMATS if name.endswith(ext)), "")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise LmforgeError(f"{path} is not a valid gzip file ({e}); recompress or remove it") from None
    return data


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{where}: not UTF-8 at byte {e.start}; convert the file to UTF-8") from None


def _read_txt(path: Path, doc_id: str) -> Iterator[Document]:
    yield Document(doc_id, _decode(_read_bytes(path), str(path)))


def _read_jsonl(path: Path, doc_id: str) -> Iterator[Document]:
    for n, line in enumerate(_read_bytes(path).split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(_decode(line, where))
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{where}: not valid JSON ({e}); fix or remove the line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise LmforgeError(f'{where}: expected an object with a string "text" field; fix or remove the line')
        yield Document(f"{doc_id}:{n}", row["text"])


def _read_parquet(path: Path, doc_id: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(_read_bytes(path)) if path.name.endswith(".gz") else path)
    except (pa.ArrowException, OSError) as e:
        raise LmforgeError(f"{path} is not a valid parquet file ({e}); rewrite or remove it") from None
    if "text" not in pf.schema_arrow.names:
        raise LmforgeError(f'{path} has no "text" column (columns: {", ".join(pf.schema_arrow.names)}); rename it')
    row = 0
    for batch in pf.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise LmforgeError(f'{path} row {row}: "text" is {text!r}, not a string; fix or drop the row')
            yield Document(f"{doc_id}:{row}", text)
            row += 1


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _limit(docs: Iterator[Document], max_bytes: int) -> Iterator[Document]:
    left = max_bytes
    for doc in docs:
        size = len(doc.text.encode())
        if size >= left:
            yield Document(doc.id, doc.text.encode()[:left].decode(errors="ignore"))
            return
        left -= size
        yield doc


def _hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


def split_docs(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) by sha256 of each document id, so every machine agrees. With val_fraction > 0 and 2+ documents,
    val gets at least the document of smallest hash; train always keeps the document of largest hash."""
    hashes = [_hash(d.id) for d in docs]
    in_val = [h < val_fraction * 2**64 for h in hashes]
    if val_fraction > 0 and len(docs) > 1 and not any(in_val):
        in_val[min(range(len(docs)), key=hashes.__getitem__)] = True
    if docs and all(in_val):
        in_val[max(range(len(docs)), key=hashes.__getitem__)] = False
    train = [d for d, v in zip(docs, in_val, strict=True) if not v]
    return train, [d for d, v in zip(docs, in_val, strict=True) if v]


def load_corpus(cfg: DataConfig) -> tuple[list[Document], list[Document]]:
    """(train, val), split by sha256 of the document id so every machine agrees; val is never empty."""
    docs = embedded_corpus() if not cfg.path else read_documents(cfg.path)
    if cfg.max_bytes:
        docs = _limit(docs, cfg.max_bytes)
    docs = list(docs)
    if not docs:
        raise LmforgeError(f"data.path={cfg.path!r} holds no documents; add text")
    if len(docs) == 1:
        # One big file (say, a novel) still needs held-out text: its last val_fraction, cut at a line break, is val.
        (doc,) = docs
        cut = round(len(doc.text) * (1 - cfg.val_fraction))
        cut = doc.text.rfind("\n", 0, cut) + 1 or cut
        return [Document(doc.id, doc.text[:cut])], [Document(f"{doc.id}#val", doc.text[cut:])]
    return split_docs(docs, cfg.val_fraction)
