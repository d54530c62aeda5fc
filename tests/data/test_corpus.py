import gzip
import json
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import from_dict
from lmforge.data import DataConfig, Document, embedded_corpus, load_corpus, read_documents
from lmforge.errors import LmforgeError


@pytest.fixture(scope="module")
def embedded() -> list[Document]:
    return list(embedded_corpus())


def test_embedded_corpus(embedded):
    ids = [d.id for d in embedded]
    assert len(ids) == len(set(ids)) > 100
    assert sum(len(d.text) for d in embedded) > 1_000_000
    assert "argparse.py" in ids and "json/decoder.py" in ids
    assert not any(part in ("site-packages", "test", "idlelib") for i in ids for part in i.split("/")[:-1])
    topics = [d for d in embedded if d.id.startswith("pydoc_data/topics/")]
    assert topics and any("statement" in d.text for d in topics)
    assert [d.id for d in islice(embedded_corpus(), 50)] == ids[:50]


def test_split_deterministic_and_disjoint(embedded):
    cfg = DataConfig(max_bytes=3_000_000)
    train, val = load_corpus(cfg)
    train2, val2 = load_corpus(cfg)
    assert [d.id for d in train] == [d.id for d in train2] and [d.id for d in val] == [d.id for d in val2]
    assert val and not {d.id for d in train} & {d.id for d in val}
    assert 0.005 < len(val) / (len(train) + len(val)) < 0.06
    total = sum(len(d.text.encode()) for d in train + val)
    assert 2_990_000 < total <= 3_000_000


def test_split_small_corpora(tmp_path):
    for n in (2, 3):
        for i in range(n):
            (tmp_path / f"{n}_{i}.txt").write_text(f"doc {i}")
    train, val = load_corpus(DataConfig(path=str(tmp_path), val_fraction=0.01))
    assert len(val) >= 1 and len(train) >= 1 and len(train) + len(val) == 5
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {i}\n" for i in range(100)))
    (train,), (val,) = load_corpus(DataConfig(path=str(one), val_fraction=0.1))
    assert train.text + val.text == one.read_text()
    assert val.text.startswith("line 90\n") and val.id == "one.txt#val"


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\nhere ü")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(b"gzipped text"))
    rows = [{"text": "j1", "meta": 1}, {"text": "j2 🙂"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": "jz"}).encode()))
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "e.parquet")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["pz"]}), buf)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.parquet.gz").write_bytes(gzip.compress(buf.getvalue().to_pybytes()))
    (tmp_path / "ignored.csv").write_text("x")
    docs = list(read_documents(tmp_path))
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt", "plain text\nhere ü"),
        ("b.txt.gz", "gzipped text"),
        ("c.jsonl:1", "j1"),
        ("c.jsonl:2", "j2 🙂"),
        ("d.jsonl.gz:1", "jz"),
        ("e.parquet:0", "p1"),
        ("e.parquet:1", "p2"),
        ("sub/f.parquet.gz:0", "pz"),
    ]
    assert [d.text for d in read_documents(tmp_path / "c.jsonl")] == ["j1", "j2 🙂"]


def test_reader_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"nope does not exist.*\.jsonl"):
        list(read_documents(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match=r"empty is empty.*\.parquet"):
        list(read_documents(empty))
    (empty / "x.csv").write_text("a,b")
    with pytest.raises(LmforgeError, match=r"holds no supported files.*\.txt"):
        list(read_documents(empty))
    with pytest.raises(LmforgeError, match="unsupported format"):
        list(read_documents(empty / "x.csv"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_documents(bad))
    bad.write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(LmforgeError, match=r'bad\.jsonl:3: expected an object with a string "text"'):
        list(read_documents(bad))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(LmforgeError, match=r'p\.parquet has no "text" column \(columns: body\)'):
        list(read_documents(tmp_path / "p.parquet"))
    (tmp_path / "notgz.txt.gz").write_text("plain")
    with pytest.raises(LmforgeError, match="not a valid gzip"):
        list(read_documents(tmp_path / "notgz.txt.gz"))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(LmforgeError, match="not UTF-8 at byte 3"):
        list(read_documents(tmp_path / "latin.txt"))


def test_config_validation(tmp_path):
    assert from_dict(DataConfig, {"path": str(tmp_path), "max_bytes": 10}).max_bytes == 10
    with pytest.raises(LmforgeError, match="data.val_fraction"):
        from_dict(DataConfig, {"val_fraction": 0})
    with pytest.raises(LmforgeError, match="data.max_bytes"):
        from_dict(DataConfig, {"max_bytes": -1})
    with pytest.raises(LmforgeError, match=r"data.path='/no/such' does not exist"):
        from_dict(DataConfig, {"path": "/no/such"})
