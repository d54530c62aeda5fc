"""Lenient reading for data preparation: every record of the input comes back as a Document or as a Reject with its
reason, so bad files and lines are counted instead of stopping the run (pre-training keeps corpus.py's strict readers).
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmforge.data.corpus import Document
from lmforge.errors import LmforgeError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".zst")
FORMATS_HELP = ".txt, .jsonl, .parquet, each optionally .gz or .zst"
EXCERPT_CHARS = 500
_CHUNK = 1 << 20


@dataclass
class Reject:
    id: str
    reason: str
    """malformed_json, missing_text_field, blank_line, parquet_schema, unreadable_file, empty_file, too_large,
    unsupported_format, or invalid_utf8_repaired (the only one whose document is kept, repaired)."""
    nbytes: int = 0
    """Raw size of what was removed (0 for a repair, whose document is kept)."""
    text: str = ""
    """The start of what was removed, for rejects.jsonl."""

    @property
    def kept(self) -> bool:
        return self.reason == "invalid_utf8_repaired"


def read_lenient(
    path: str | Path, text_field: str = "text", max_doc_bytes: int = 10 << 20
) -> Iterator[Document | Reject]:
    """Documents of a file or of every file under a folder (sorted), with ids as corpus.read_documents gives them;
    a .txt file is one document, so max_doc_bytes applies to the whole file."""
    files, root = input_files(path)
    yield from read_files(files, root, text_field, max_doc_bytes)


def input_files(path: str | Path) -> tuple[list[Path], Path]:
    """The files of `path` in reading order (sorted), and the folder their document ids are relative to."""
    path = Path(path)
    if path.is_dir():
        files, root = sorted(p for p in path.rglob("*") if p.is_file()), path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise LmforgeError(f"input {path} does not exist; give a folder or file of {FORMATS_HELP}")
    if not files:
        raise LmforgeError(f"input folder {path} is empty; add files of {FORMATS_HELP}")
    return files, root


def read_files(
    files: list[Path], root: Path, text_field: str = "text", max_doc_bytes: int = 10 << 20
) -> Iterator[Document | Reject]:
    """Documents and rejects of `files`, in order, with ids relative to `root`."""
    for file in files:
        doc_id = file.relative_to(root).as_posix()
        fmt = _format(file)
        if not fmt:
            yield Reject(doc_id, "unsupported_format", _size(file))
            continue
        yield from _read_file(file, doc_id, fmt, text_field, max_doc_bytes)


Piece = tuple[int, int, int]  # (start byte, end byte, number of the first line) of a run of whole lines


def splittable(path: Path) -> bool:
    """Uncompressed JSONL: a file that can be cut into pieces at line ends, read each on its own."""
    return path.name.endswith(".jsonl")


def jsonl_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    """`path` cut after the first line end at or past every piece_bytes; line numbers are counted in one pass, so
    each piece's documents get the ids a whole-file read gives them."""
    pieces, start, first_line, newlines, offset = [], 0, 1, 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            counted = 0  # newlines of chunk[:counted] are in `newlines`
            while (at := start + piece_bytes - offset) < len(chunk):
                cut = chunk.find(b"\n", max(at, counted))
                if cut == -1:
                    break
                newlines += chunk.count(b"\n", counted, cut + 1)
                counted = cut + 1
                pieces.append((start, offset + cut + 1, first_line))
                start, first_line = offset + cut + 1, newlines + 1
            newlines += chunk.count(b"\n", counted)
            offset += len(chunk)
    if start < offset or not pieces:
        pieces.append((start, offset, first_line))
    return pieces


def read_piece(
    file: Path, root: Path, piece: Piece, text_field: str = "text", max_doc_bytes: int = 10 << 20
) -> Iterator[Document | Reject]:
    """Documents and rejects of the lines of an uncompressed JSONL file in `piece`."""
    yield from _read_file(file, file.relative_to(root).as_posix(), ".jsonl", text_field, max_doc_bytes, piece)


def _format(path: Path) -> str:
    name = path.name
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return next((ext for ext in FORMATS if name.endswith(ext)), "")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class _Chunks(io.RawIOBase):
    """The bytes of an iterator of chunks as a stream that ends where the iterator fails, keeping the error: the
    records before a truncation or corruption are read and counted, the rest is counted as one unreadable part."""

    def __init__(self, chunks: Iterator[bytes], source: BinaryIO):
        self.chunks, self.source, self.error = chunks, source, None
        self.pending, self.at = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            try:
                self.pending, self.at = memoryview(next(self.chunks)), 0
            except StopIteration:
                return 0
            except Exception as e:  # zlib.error, EOFError, zstd errors, OSError
                self.error = e
                self.chunks = iter(())
                return 0
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = self.pending[self.at : self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.source.close()
        super().close()


def _gunzip(f: BinaryIO) -> Iterator[bytes]:
    """The decompressed bytes of a gzip file of any number of members, at most _CHUNK per piece. On corrupt data every
    byte before the fault comes out before the error (a failed zlib call drops what it had decompressed)."""
    d, data, started = zlib.decompressobj(31), b"", False
    while True:
        if not data and not (data := f.read(1 << 16)):
            if started and not d.eof:  # (an empty file is an empty stream, as gzip reads it)
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            return
        started = True
        if d.eof:
            if not data.strip(b"\0"):  # zero padding after the last member, which gzip tolerates
                data = b""
                continue
            d = zlib.decompressobj(31)
        before = d.copy()
        try:
            out = d.decompress(data, _CHUNK)
        except zlib.error:
            for i in range(len(data)):
                yield before.decompress(data[i : i + 1])  # raises at the faulty byte
            raise
        data = d.unused_data if d.eof else d.unconsumed_tail
        yield out


def _open(path: Path) -> BinaryIO:
    if path.name.endswith(".gz"):
        f = open(path, "rb")  # noqa: SIM115 (closed with the stream returned)
        return io.BufferedReader(_Chunks(_gunzip(f), f), _CHUNK)
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise LmforgeError(
                f"{path} is zstd-compressed and the zstandard package is missing; `pip install zstandard` or "
                "decompress the file"
            ) from None
        # A truncated zstd stream ends without an error here: its cut last line counts as malformed.
        f = open(path, "rb")  # noqa: SIM115 (closed with the stream returned)
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True, closefd=True)
        return io.BufferedReader(_Chunks(iter(lambda: reader.read1(_CHUNK), b""), reader), _CHUNK)
    return open(path, "rb")


def _failure(stream: BinaryIO) -> str:
    """Why a decompressed stream ended early ("" if it did not), for the unreadable reject of its rest."""
    error = getattr(getattr(stream, "raw", None), "error", None)
    return f"{type(error).__name__}: {error}"[:EXCERPT_CHARS] if error else ""


def _read_file(
    path: Path, doc_id: str, fmt: str, text_field: str, max_doc_bytes: int, piece: Piece | None = None
) -> Iterator[Document | Reject]:
    try:
        with _open(path) as stream:
            if piece:
                stream.seek(piece[0])
                yield from _read_jsonl(stream, doc_id, text_field, max_doc_bytes, piece[2], piece[1] - piece[0])
                return
            reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[fmt]
            yield from reader(stream, doc_id, text_field, max_doc_bytes)
    except LmforgeError:
        raise
    except Exception as e:
        # Corrupt compression, permissions and I/O errors surface at any read; what was read before still counts.
        yield Reject(doc_id, "unreadable_file", _size(path), f"{type(e).__name__}: {e}"[:EXCERPT_CHARS])


def _decode(data: bytes, doc_id: str) -> tuple[str, Reject | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, Reject(doc_id, "invalid_utf8_repaired", 0, text[:EXCERPT_CHARS])


def _read_txt(stream: BinaryIO, doc_id: str, text_field: str, max_doc_bytes: int) -> Iterator[Document | Reject]:
    data = stream.read(max_doc_bytes + 1)
    if (error := _failure(stream)) and len(data) <= max_doc_bytes:
        yield Reject(doc_id, "unreadable_file", len(data), error)  # a document cut short is not a document
    elif len(data) > max_doc_bytes:
        size = len(data) + sum(len(chunk) for chunk in iter(lambda: stream.read(_CHUNK), b""))
        yield Reject(doc_id, "too_large", size, data[:EXCERPT_CHARS].decode(errors="replace"))
    elif not data.strip():
        yield Reject(doc_id, "empty_file", len(data))
    else:
        text, repaired = _decode(data, doc_id)
        yield Document(doc_id, text)
        if repaired:
            yield repaired


def _lines(stream: BinaryIO, max_bytes: int, limit: int | None = None) -> Iterator[tuple[bytes, int, bool]]:
    """(line, size, whether it ends with a newline) per line of the next `limit` bytes (all if None, else they must
    end a line); a line over max_bytes comes back as its first bytes, never held whole in memory."""
    buffered = io.BufferedReader(stream) if not isinstance(stream, io.BufferedIOBase) else stream
    consumed = 0
    while (limit is None or consumed < limit) and (line := buffered.readline(max_bytes + 1)):
        size, tail = len(line), line
        while size > max_bytes and not tail.endswith(b"\n") and (more := buffered.readline(_CHUNK)):
            size, tail = size + len(more), more
        consumed += size
        yield line, size, tail.endswith(b"\n")


def _read_jsonl(
    stream: BinaryIO, doc_id: str, text_field: str, max_doc_bytes: int, first_line: int = 1, limit: int | None = None
) -> Iterator[Document | Reject]:
    n, cut = first_line - 1, 0
    for n, (line, size, whole) in enumerate(_lines(stream, max_doc_bytes, limit), first_line):
        line_id = f"{doc_id}:{n}"
        if not whole and _failure(stream):
            cut = size  # the line the stream broke off in: part of the unreadable rest
            break
        if not line.strip():
            yield Reject(line_id, "blank_line", size)
            continue
        if size > max_doc_bytes:
            yield Reject(line_id, "too_large", size, line[:EXCERPT_CHARS].decode(errors="replace"))
            continue
        raw, repaired = _decode(line, line_id)
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            yield Reject(line_id, "malformed_json", size, raw[:EXCERPT_CHARS])
            continue
        if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
            yield Reject(line_id, "missing_text_field", size, raw[:EXCERPT_CHARS])
            continue
        text = row[text_field]
        if not text.isascii():
            # JSON escapes can spell lone surrogates ("\ud800"), which are not text and cannot be written as UTF-8.
            try:
                text.encode()
            except UnicodeEncodeError:
                text = text.encode(errors="replace").decode()
                repaired = repaired or Reject(line_id, "invalid_utf8_repaired", 0, text[:EXCERPT_CHARS])
        yield Document(line_id, text)
        if repaired:
            yield repaired
    if error := _failure(stream):
        yield Reject(doc_id, "unreadable_file", cut, error)
    elif n < first_line and limit is None:  # no line at all (a piece of a longer file always has one)
        yield Reject(doc_id, "empty_file", 0)


def _read_parquet(stream: BinaryIO, doc_id: str, text_field: str, max_doc_bytes: int) -> Iterator[Document | Reject]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(getattr(stream, "raw", None), io.FileIO):  # a plain file: pyarrow seeks in it, not reading it whole
        source, nbytes = stream, os.fstat(stream.fileno()).st_size
    else:
        data = stream.read()
        if error := _failure(stream):
            yield Reject(doc_id, "unreadable_file", len(data), error)
            return
        source, nbytes = pa.BufferReader(data), len(data)
    if not nbytes:
        yield Reject(doc_id, "empty_file", 0)
        return
    pf = pq.ParquetFile(source)
    names = pf.schema_arrow.names
    if text_field not in names:
        yield Reject(doc_id, "parquet_schema", nbytes, f"columns: {', '.join(names)}"[:EXCERPT_CHARS])
        return
    if pf.metadata.num_rows == 0:
        yield Reject(doc_id, "empty_file", nbytes)
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row_id, row = f"{doc_id}:{row}", row + 1
            if not isinstance(text, str):
                yield Reject(row_id, "missing_text_field", 0, repr(text)[:EXCERPT_CHARS])
            elif (size := len(text.encode())) > max_doc_bytes:
                yield Reject(row_id, "too_large", size, text[:EXCERPT_CHARS])
            else:
                yield Document(row_id, text)
