"""Lenient reading on real bad files: every record comes back as a document or as a reject with its reason."""

import gzip
import json
import sys
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmforge.data.corpus import Document, read_documents
from lmforge.data.readers import Reject, read_lenient
from lmforge.errors import LmforgeError

GOOD = "A plain sentence about rivers and gardens."


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def split(items):
    items = list(items)
    docs = {i.id: i.text for i in items if isinstance(i, Document)}
    rejects = [(i.id, i.reason) for i in items if isinstance(i, Reject)]
    return docs, rejects


def test_good_files_read_as_the_strict_reader_reads_them(tmp_path):
    (tmp_path / "a.txt").write_text(GOOD)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines({"text": GOOD}, "", {"text": "two"}).encode()))
    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "c.parquet")
    docs, rejects = split(read_lenient(tmp_path))
    assert [Document(k, v) for k, v in docs.items()] == list(read_documents(tmp_path))
    assert rejects == [("b.jsonl.gz:2", "blank_line")]  # skipped by the strict reader, counted here


def test_each_bad_input_has_its_reason(tmp_path):
    (tmp_path / "bad_utf8.txt").write_bytes(b"caf\xe9 au lait " + GOOD.encode())
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "empty.jsonl.gz").write_bytes(b"")
    mixed = lines({"text": GOOD}, '{"text": "unclosed', {"body": GOOD}, [1], {"text": "ok"})
    (tmp_path / "mixed.jsonl").write_text(mixed)
    (tmp_path / "big.jsonl").write_text(lines({"text": "x" * 300}, {"text": GOOD}))
    pq.write_table(pa.table({"body": [GOOD]}), tmp_path / "other.parquet")
    pq.write_table(pa.table({"text": [GOOD, None]}), tmp_path / "nulls.parquet")
    packed = gzip.compress(lines(*[{"text": f"{GOOD} {i}"} for i in range(500)]).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    (tmp_path / "notes.md").write_text(GOOD)
    docs, rejects = split(read_lenient(tmp_path, max_doc_bytes=200))
    assert docs["bad_utf8.txt"] == "caf\ufffd au lait " + GOOD
    assert sorted(rejects) == [
        ("bad_utf8.txt", "invalid_utf8_repaired"),
        ("big.jsonl:1", "too_large"),
        ("cut.jsonl.gz", "unreadable_file"),
        ("empty.jsonl.gz", "empty_file"),
        ("empty.jsonl:1", "blank_line"),
        ("empty.jsonl:2", "blank_line"),
        ("empty.txt", "empty_file"),
        ("mixed.jsonl:2", "malformed_json"),
        ("mixed.jsonl:3", "missing_text_field"),
        ("mixed.jsonl:4", "missing_text_field"),
        ("notes.md", "unsupported_format"),
        ("nulls.parquet:1", "missing_text_field"),
        ("other.parquet", "parquet_schema"),
    ]
    assert {k: v for k, v in docs.items() if not k.startswith("cut")} == {
        "bad_utf8.txt": "caf\ufffd au lait " + GOOD,
        "big.jsonl:2": GOOD,
        "mixed.jsonl:1": GOOD,
        "mixed.jsonl:5": "ok",
        "nulls.parquet:0": GOOD,
    }


def test_a_12_mb_line_is_too_large_and_the_next_line_still_reads(tmp_path):
    (tmp_path / "huge.jsonl").write_text(lines({"text": "word " * (12 << 18)}, {"text": GOOD}))
    items = list(read_lenient(tmp_path / "huge.jsonl"))
    assert [type(i).__name__ for i in items] == ["Reject", "Document"]
    assert items[0].reason == "too_large" and items[0].nbytes > 12 << 20 and len(items[0].text) == 500
    assert items[1] == Document("huge.jsonl:2", GOOD)


def test_any_text_field_and_zstd(tmp_path):
    data = lines({"content": GOOD}, {"text": "not this one"})
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data.encode()))
    pq.write_table(pa.table({"content": ["row"]}), tmp_path / "b.parquet")
    docs, rejects = split(read_lenient(tmp_path, text_field="content"))
    assert docs == {"a.jsonl.zst:1": GOOD, "b.parquet:0": "row"}
    assert rejects == [("a.jsonl.zst:2", "missing_text_field")]


def test_zstd_without_zstandard_names_the_fix(tmp_path, monkeypatch):
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(GOOD.encode()))
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(LmforgeError, match="pip install zstandard"):
        list(read_lenient(tmp_path))


def test_unreadable_file(tmp_path):
    # a file that cannot be parsed at all (tests run as root, so a chmod 000 file would still be readable)
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file at all")
    assert Counter(r.reason for r in read_lenient(tmp_path)) == {"unreadable_file": 1}


def test_missing_or_empty_input_is_a_user_error(tmp_path):
    with pytest.raises(LmforgeError, match="is empty"):
        list(read_lenient(tmp_path))
    with pytest.raises(LmforgeError, match="does not exist"):
        list(read_lenient(tmp_path / "nope"))


def test_lone_surrogates_from_json_escapes_are_repaired(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "half a pair \\ud800 here"}\n{"text": "fine \\u00e9"}\n')
    docs, rejects = split(read_lenient(tmp_path))
    assert docs == {"a.jsonl:1": "half a pair ? here", "a.jsonl:2": "fine é"}
    assert rejects == [("a.jsonl:1", "invalid_utf8_repaired")]
    assert all(text.encode() for text in docs.values())  # writable as UTF-8


@pytest.mark.parametrize("piece_bytes", [1, 7, 40, 10_000])
def test_jsonl_pieces_read_as_the_whole_file_does(tmp_path, piece_bytes):
    from lmforge.data.readers import jsonl_pieces, read_piece

    rows = [{"text": f"{GOOD} {i}"} for i in range(12)]
    text = lines(*rows[:3], "", "{broken", {"body": "x"}, {"text": "y" * 300}, *rows[3:], "   ") + json.dumps(rows[0])
    path = tmp_path / "a.jsonl"
    path.write_text(text)  # blank lines, bad lines, a line over max_doc_bytes, no newline at the end
    pieces = jsonl_pieces(path, piece_bytes)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(text.encode())
    assert all(end == start for (_, end, _), (start, _, _) in zip(pieces, pieces[1:], strict=False))
    whole = list(read_lenient(path, max_doc_bytes=200))
    assert [x for piece in pieces for x in read_piece(path, tmp_path, piece, max_doc_bytes=200)] == whole
    assert len(pieces) > 1 or piece_bytes > len(text)


def readable_prefix(blob: bytes) -> bytes:
    """What zlib decompresses of a gzip blob before its first fault, fed a byte at a time so that nothing is lost."""
    d, out = zlib.decompressobj(31), []
    for i in range(len(blob)):
        try:
            out.append(d.decompress(blob[i : i + 1]))
        except zlib.error:
            break
    return b"".join(out)


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "bad_crc"])
def test_a_damaged_gzip_counts_each_readable_line_and_one_unreadable_rest(tmp_path, damage):
    data = lines(
        *[{"text": f"{GOOD} {i}"} for i in range(400)], "", {"body": "x"}, *[{"text": str(i)} for i in range(9)]
    )
    blob = bytearray(gzip.compress(data.encode()))
    if damage == "truncated":
        blob = blob[: len(blob) * 2 // 3]
    elif damage == "corrupt":
        blob[len(blob) // 2 : len(blob) // 2 + 16] = b"\xff" * 16
    else:
        blob[-8] ^= 1  # the CRC: every line decompresses, the check at the end fails
    (tmp_path / "a.jsonl.gz").write_bytes(bytes(blob))
    readable = readable_prefix(bytes(blob))
    items = list(read_lenient(tmp_path / "a.jsonl.gz"))
    # every whole line of the readable part is a document or a line reject; the rest is one unreadable reject
    assert [i.reason for i in items if isinstance(i, Reject) and ":" not in i.id] == ["unreadable_file"]
    assert len(items) - 1 == readable.count(b"\n") > 0
    assert [i.id for i in items[:-1]] == [f"a.jsonl.gz:{n}" for n in range(1, len(items))]
    assert items[-1].nbytes == len(readable) - len(readable.rpartition(b"\n")[0]) - (readable.count(b"\n") > 0)


def test_a_truncated_txt_gz_is_one_unreadable_document(tmp_path):
    blob = gzip.compress((GOOD * 2000).encode())
    (tmp_path / "a.txt.gz").write_bytes(blob[: len(blob) // 2])
    assert [(i.id, i.reason) for i in read_lenient(tmp_path)] == [("a.txt.gz", "unreadable_file")]


def test_multi_member_gzip_reads_every_member(tmp_path):
    blob = gzip.compress(lines({"text": "one"}).encode()) + gzip.compress(lines({"text": "two"}).encode()) + b"\0" * 8
    (tmp_path / "a.jsonl.gz").write_bytes(blob)
    assert split(read_lenient(tmp_path)) == ({"a.jsonl.gz:1": "one", "a.jsonl.gz:2": "two"}, [])


def test_blank_lines_are_counted_as_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text(lines("", {"text": GOOD}, "  ", "\t") + "\n")
    docs, rejects = split(read_lenient(tmp_path))
    assert docs == {"a.jsonl:2": GOOD}
    assert rejects == [
        ("a.jsonl:1", "blank_line"),
        ("a.jsonl:3", "blank_line"),
        ("a.jsonl:4", "blank_line"),
        ("a.jsonl:5", "blank_line"),
    ]


def test_compressed_parquet_reads_like_plain_parquet(tmp_path):
    pq.write_table(pa.table({"text": [GOOD, "two"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    (tmp_path / "c.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "a.parquet").read_bytes()))
    docs, rejects = split(read_lenient(tmp_path))
    assert rejects == [] and docs == {
        f"{name}:{i}": text
        for name in ("a.parquet", "b.parquet.gz", "c.parquet.zst")
        for i, text in enumerate([GOOD, "two"])
    }
