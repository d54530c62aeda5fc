"""The data stage end to end on a hand-made corpus: exact per-stage counts, scrubbed shards, rejects, CLI."""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import load_config
from lmforge.data.prepare import DataPrepConfig, add_arguments, command, main
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

LDNOOBW = Path(__file__).resolve().parents[1] / "fixtures/ldnoobw_en.txt"
_WORDS = (
    "river garden window market teacher morning silver planet engine harbor letter forest village winter "
    "summer candle bridge doctor kitchen mountain painter station journey pocket ribbon valley thunder "
    "orange meadow castle lantern button feather compass blanket pepper saddle island tunnel marble "
    "quietly slowly bright gentle narrow ancient modern simple careful hidden golden wooden distant "
    "walks builds carries watches finds opens gathers follows repairs describes measures remembers"
)
VOCAB = _WORDS.split(" ")


def clean(seed: int, sentences: int = 12) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = rng.sample(VOCAB, 7)
        out.append(f"The {words[0]} {words[1]} and {' '.join(words[2:])} with the {rng.choice(VOCAB)}.")
    return " ".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    dup = clean(1)
    near = dup.split()
    near[40] = "zeppelin"
    files = {
        "clean_a.txt": clean(2),
        "clean_b.txt": clean(3),
        "dup.txt": dup,
        "dup_copy.txt": dup,
        "dup_spacing.txt": dup.upper().replace(" ", "  "),  # same after case and whitespace folding
        "near.txt": " ".join(near),
        "short.txt": "Hello there, the cat and the dog.",
        "lorem.txt": "Lorem ipsum dolor sit amet. " + clean(4),
        "pii.txt": clean(5) + " Mail jane.doe@example.com or pay with card 4111 1111 1111 1111 today.",
        "toxic.txt": clean(6).replace("The", "The bastard", 3),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    rows = [{"text": clean(7)}, {"text": " \u200b\n\t "}, {"text": clean(8)}]
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(corpus: Path, out: Path, *extra: str) -> DataPrepConfig:
    overrides = [f"input={corpus}", f"output={out}", "vocab_size=300", f"toxicity.wordlist={LDNOOBW}", *extra]
    return load_config(DataPrepConfig, Path(__file__).resolve().parents[2] / "configs/data/web.yaml", overrides)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, main(config(corpus, out))


def test_stats_count_every_stage_and_reason_exactly(prepared):
    out, stats = prepared
    assert json.loads((out / "stats.json").read_text()) == stats
    stages = {s["name"]: s for s in stats["stages"]}
    assert list(stages) == ["read", "normalize", "quality", "dedup", "scrub", "toxicity"]
    assert stages["read"]["removed"] == {} and stages["read"]["repaired"] == {"invalid_utf8": 0}
    assert stages["normalize"]["removed"] == {"empty_after_normalize": 1}
    assert stages["quality"]["removed"] == {"lorem_ipsum": 1, "too_few_words": 1}
    assert stages["dedup"]["removed"] == {"exact_duplicate": 2, "near_duplicate": 1}
    assert stages["scrub"]["removed"] == {}
    assert stages["scrub"]["replaced"] == {
        "credit_card": 1,
        "email": 1,
        "gov_id": 0,
        "ip": 0,
        "phone": 0,
        "secrets": 0,
    }
    assert stages["toxicity"]["removed"] == {"toxic_words": 1}
    assert stats["docs_in"] == 13 and stats["docs_out"] == 6
    assert stats["docs_out"] == stats["docs_in"] - sum(sum(s["removed"].values()) for s in stats["stages"])
    for before, after in zip(stats["stages"], stats["stages"][1:], strict=False):
        assert after["docs_in"] == before["docs_out"] and after["bytes_in"] == before["bytes_out"]
    assert stages["scrub"]["bytes_out"] < stages["scrub"]["bytes_in"]


def test_shards_hold_scrubbed_text_only(prepared):
    out, stats = prepared
    tokenizer = Tokenizer.load(out / "tokenizer")
    text, num_docs = "", 0
    for part in ("train", "val"):
        manifest = json.loads((out / part / "manifest.json").read_text())
        num_docs += manifest["num_docs"]
        ids = np.concatenate([np.fromfile(out / part / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]])
        text += tokenizer.decode(ids.tolist(), skip_special=True)
    assert num_docs == stats["docs_out"] == sum(stats["split"].values())
    assert "<EMAIL>" in text and "<CREDIT_CARD>" in text
    assert "jane.doe@example.com" not in text and "4111" not in text
    assert "bastard" not in text and "Lorem" not in text and "zeppelin" not in text


def test_rejects_lineage_and_report(prepared):
    out, stats = prepared
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["reason"]) for r in rejects} == {
        ("normalize", "empty_after_normalize"),
        ("quality", "too_few_words"),
        ("quality", "lorem_ipsum"),
        ("dedup", "exact_duplicate"),
        ("dedup", "near_duplicate"),
        ("toxicity", "toxic_words"),
    }
    assert {r["id"] for r in rejects if r["reason"] == "near_duplicate"} == {"near.txt"}
    assert all(len(r["text"]) <= 500 for r in rejects)
    lineage = json.loads((out / "lineage.json").read_text())
    assert [s["name"] for s in lineage["stages"]] == [s["name"] for s in stats["stages"]]
    assert lineage["stages"][3]["config"]["threshold"] == 0.8
    assert lineage["tokenizer"]["sha256"] == Tokenizer.load(out / "tokenizer").sha256
    report = (out / "report.md").read_text()
    assert "| dedup | 10 | 7 |" in report and "near_duplicate 1" in report


def test_rejects_sample_caps_each_reason(corpus, prepared, tmp_path):
    main(config(corpus, tmp_path, "rejects_sample=1"))
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sum(r["reason"] == "exact_duplicate" for r in rejects) == 1


def test_rerun_into_same_output_is_consistent(corpus, prepared):
    out, stats = prepared
    files = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert main(config(corpus, out)) == stats
    assert {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge data")
    add_arguments(p)
    return p


def test_cli_prepare_and_stats_print_the_table(corpus, prepared, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["prepare", "--config", "configs/data/web.yaml", f"input={corpus}", f"output={out}", "vocab_size=300"]
    command(parser().parse_args([*args, f"toxicity.wordlist={LDNOOBW}"]))
    printed = capsys.readouterr().out
    command(parser().parse_args(["stats", str(out)]))
    table = capsys.readouterr().out
    assert table in printed
    assert "| quality | 12 | 10 |" in table and "lorem_ipsum 1, too_few_words 1" in table
    assert "email replaced 1" in table and "13 documents in, 6 kept." in table


def test_cli_unknown_key_and_missing_stats_are_user_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"unknown config key quality\.min_wrds; did you mean quality\.min_words"):
        command(parser().parse_args(["prepare", "quality.min_wrds=3", f"output={tmp_path}"]))
    assert not any(tmp_path.iterdir())  # nothing written before the config is valid
    with pytest.raises(LmforgeError, match="stats.json is missing"):
        command(parser().parse_args(["stats", str(tmp_path)]))


def test_everything_removed_is_a_user_error(corpus, tmp_path):
    with pytest.raises(LmforgeError, match="all 13 documents were removed"):
        main(config(corpus, tmp_path, "quality.min_words=100000"))
    assert json.loads((tmp_path / "stats.json").read_text())["docs_out"] == 0


def test_bad_inputs_are_counted_in_the_read_stage_and_rejects(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"good_{i}.txt").write_text(clean(20 + i))
    (src / "bad_utf8.txt").write_bytes(clean(30).encode() + b" \xff\xfe end")
    (src / "empty.txt").write_bytes(b"")
    (src / "big.jsonl").write_text(json.dumps({"text": "word " * 500}) + "\n" + json.dumps({"text": clean(31)}) + "\n")
    (src / "mixed.jsonl").write_text('{"text": "unclosed\n' + json.dumps({"body": clean(32)}) + "\n")
    pq.write_table(pa.table({"body": [clean(33)]}), src / "other.parquet")
    packed = gzip.compress("".join(json.dumps({"text": clean(i)}) + "\n" for i in range(40, 90)).encode())
    (src / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    out = tmp_path / "out"
    stats = main(config(src, out, "max_doc_bytes=2000", "val_fraction=0.3"))
    read = stats["stages"][0]
    assert read["name"] == "read" and read["repaired"] == {"invalid_utf8": 1}
    assert read["removed"] == {
        "empty_file": 1,
        "malformed_json": 1,
        "missing_text_field": 1,
        "parquet_schema": 1,
        "too_large": 1,
        "unreadable_file": 1,
    }
    assert read["docs_in"] == read["docs_out"] + 6 and read["bytes_in"] > read["bytes_out"] + 2500
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {(r["reason"], r["id"]) for r in rejects if r["stage"] == "read"} == {
        ("invalid_utf8_repaired", "bad_utf8.txt"),
        ("empty_file", "empty.txt"),
        ("too_large", "big.jsonl:1"),
        ("malformed_json", "mixed.jsonl:1"),
        ("missing_text_field", "mixed.jsonl:2"),
        ("parquet_schema", "other.parquet"),
        ("unreadable_file", "cut.jsonl.gz"),
    }
    assert "read" in {s["name"] for s in json.loads((out / "lineage.json").read_text())["stages"]}


def test_val_split_matches_pretraining_and_is_disjoint(corpus, tmp_path):
    from lmforge.data.corpus import DataConfig, load_corpus, split_docs
    from lmforge.data.readers import Reject, read_lenient

    cfg = config(corpus, tmp_path, "val_fraction=0.3")
    docs = [d for d in read_lenient(corpus) if not isinstance(d, Reject)]
    train, val = split_docs(docs, 0.3)
    ref_train, ref_val = load_corpus(DataConfig(path=str(corpus), val_fraction=0.3))
    assert [d.id for d in val] == [d.id for d in ref_val] and [d.id for d in train] == [d.id for d in ref_train]
    assert val and train and not {d.id for d in train} & {d.id for d in val}
    stats = main(cfg)
    for part in ("train", "val"):
        manifest = json.loads((tmp_path / part / "manifest.json").read_text())
        assert manifest["num_docs"] == stats["split"][part] > 0
    assert stats["split"]["train"] + stats["split"]["val"] == stats["docs_out"]
    main(config(corpus, tmp_path, "val_fraction=0"))
    assert not (tmp_path / "val").exists()


def test_langid_stage_keeps_english_and_rejects_german(corpus, tmp_path):
    german = (Path(__file__).resolve().parents[1] / "fixtures/german.txt").read_text()
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"en_{i}.txt").write_text(clean(60 + i))
    (src / "de.txt").write_text(german[:3000])
    stats = main(config(src, tmp_path / "out", "langid.enabled=true"))
    stages = {s["name"]: s for s in stats["stages"]}
    assert list(stages)[:3] == ["read", "normalize", "langid"]
    assert stages["langid"]["removed"] == {"lang_de": 1} and stages["langid"]["docs_out"] == 3


@pytest.mark.parametrize("shard_bytes", [1 << 26, 2000])
def test_every_line_read_is_counted_once(tmp_path, shard_bytes):
    """The read stage takes in exactly the input files' own counts (a line per JSONL line, blank or not, plus the
    unreadable rest of a damaged .gz; a document per text file; a row per Parquet row), and each later stage takes in
    what the one before kept."""
    import gzip
    import zlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    src.mkdir()
    own: dict[str, int] = {}
    rows = [json.dumps({"text": clean(i)}) for i in range(100, 112)]
    blank = "\n".join(["", rows[0], "   ", rows[1], "\t", "", rows[2], rows[0], '{"text": "cut'])  # no final newline
    (src / "blank.jsonl").write_text(blank)
    own["blank.jsonl"] = blank.count("\n") + 1
    packed = gzip.compress(("\n".join(rows[3:]) + "\n\n").encode())
    cut = packed[: len(packed) * 3 // 4]
    (src / "cut.jsonl.gz").write_bytes(cut)
    own["cut.jsonl.gz"] = zlib.decompressobj(31).decompress(cut).count(b"\n") + 1  # the lines, then the rest
    (src / "a.txt").write_text(clean(120))
    (src / "empty.txt").write_text("")
    (src / "notes.md").write_text("not read")
    pq.write_table(pa.table({"text": [clean(121), None, ""]}), src / "rows.parquet")
    own |= {"a.txt": 1, "empty.txt": 1, "notes.md": 1, "rows.parquet": 3}
    stats = main(config(src, tmp_path / "out", f"shard_bytes={shard_bytes}"))
    read = stats["stages"][0]
    assert stats["docs_in"] == read["docs_in"] == sum(own.values())
    assert read["removed"]["blank_line"] == 4 and read["removed"]["unreadable_file"] == 1
    for before, after in zip(stats["stages"], stats["stages"][1:], strict=False):
        assert after["docs_in"] == before["docs_out"]
    for stage in stats["stages"]:
        assert stage["docs_in"] - stage["docs_out"] == sum(stage["removed"].values()), stage["name"]
    assert stats["docs_out"] == stats["stages"][-1]["docs_out"] == sum(stats["split"].values())
