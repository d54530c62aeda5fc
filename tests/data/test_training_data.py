"""A `lmforge data prepare` output feeds pre-training: its tokenizer and shards, the run's data lineage, bad folders."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from lmforge.config import load_config
from lmforge.data import prepare
from lmforge.data.config import DataPrepConfig
from lmforge.data.normalize import normalize
from lmforge.data.shards import link_shards, read_manifest, shard_arrays
from lmforge.data.training_data import is_prepared, prepared_documents
from lmforge.errors import LmforgeError
from lmforge.run import Run, atomic_write
from lmforge.tokenizer import Tokenizer
from lmforge.train import pretrain

VOCAB = 320
TINY = [
    f"model.vocab_size={VOCAB}",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.hidden_dim=64",
    "model.max_seq_len=32",
    "train.batch_size=4",
    "train.steps=2",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.warmup_steps=1",
    "sample.prompts=[]",
]


@pytest.fixture(scope="module")
def texts(tiny_text) -> list[str]:
    """24 distinct prose documents, 3 of them twice, and one too short for the quality rules."""
    prose = [tiny_text[i * 2500 : (i + 1) * 2500] for i in range(24)]
    return prose + prose[:3] + ["Too short to keep."]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("prepared")
    (root / "in").mkdir()
    (root / "in/docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = DataPrepConfig(
        input=str(root / "in"), output=str(root / "out"), vocab_size=VOCAB, val_fraction=0.25, kind="prose", workers=1
    )
    prepare.main(cfg)
    return root / "out"


def run_pretrain(root, data_path, *overrides, name="r", resume=False) -> Run:
    args = [*TINY, f"data.path={data_path}", f"run.root={root}", f"run.name={name}", *overrides]
    cfg = load_config(pretrain.PretrainConfig, None, args)
    cfg.resume = resume
    run = Run.from_config(cfg.run)
    pretrain.main(cfg, run)
    return run


def test_pretrain_trains_on_the_prepared_shards_and_records_the_lineage(tmp_path, prepared):
    assert is_prepared(prepared) and not is_prepared(prepared / "train")
    run = run_pretrain(tmp_path, prepared)
    assert Tokenizer.load(run.file("tokenizer.json")).sha256 == Tokenizer.load(prepared / "tokenizer").sha256
    for split in ("train", "val"):
        assert read_manifest(run.file(f"data/{split}")) == read_manifest(prepared / split)
        ours, theirs = shard_arrays(run.file(f"data/{split}")), shard_arrays(prepared / split)
        assert [a.tolist() for a in ours] == [a.tolist() for a in theirs]
    corpus = run.read_json("pretrain.json")["corpus"]
    assert corpus["train_tokens"] == read_manifest(prepared / "train")["total_tokens"]
    assert corpus["val_tokens"] == read_manifest(prepared / "val")["total_tokens"]

    data = run.read_json("data.json")
    stats = json.loads((prepared / "stats.json").read_text())
    assert data["lineage"] == {
        "prepared": str(prepared.resolve()),
        "input": stats["input"],
        "stats_sha256": hashlib.sha256((prepared / "stats.json").read_bytes()).hexdigest(),
        "tokenizer_sha256": Tokenizer.load(prepared / "tokenizer").sha256,
        "vocab_size": VOCAB,
    }
    assert [(r["stage"], r["docs_in"], r["docs_kept"]) for r in data["stages"]] == [
        (s["name"], s["docs_in"], s["docs_out"]) for s in stats["stages"]
    ]
    rows = {r["stage"]: r for r in data["stages"]}
    assert "too_few_words 1" in rows["quality"]["removed"]
    assert rows["dedup"]["docs_removed"] >= 1 and "exact_duplicate" in rows["dedup"]["removed"]
    assert data["split"]["train_docs"] + data["split"]["val_docs"] == stats["docs_out"]
    (checkpoint,) = sorted(run.file("checkpoints").glob("step_*"))
    assert json.loads((checkpoint / "data_lineage.json").read_text()) == data["lineage"]

    # resuming finds everything in place and continues
    before = run.file("data.json").stat().st_mtime_ns
    run_pretrain(tmp_path, prepared, "train.steps=3", resume=True)
    assert run.file("data.json").stat().st_mtime_ns == before
    assert [r["step"] for r in run.read_metrics() if "loss" in r][-1] == 3


def test_a_vocab_size_other_than_the_prepared_tokenizers_names_the_fix(tmp_path, prepared):
    with pytest.raises(LmforgeError, match=f"prepared with a {VOCAB}-token tokenizer.*set model.vocab_size={VOCAB}"):
        run_pretrain(tmp_path, prepared, "model.vocab_size=384")
    assert not (tmp_path / "r" / "data").exists()


def test_unfinished_and_one_split_folders_are_refused(tmp_path, prepared):
    unfinished = shutil.copytree(prepared, tmp_path / "unfinished")
    (unfinished / "lineage.json").unlink()
    with pytest.raises(LmforgeError, match="unfinished `lmforge data prepare` output"):
        run_pretrain(tmp_path, unfinished)
    no_val = shutil.copytree(prepared, tmp_path / "no_val")
    shutil.rmtree(no_val / "val")
    with pytest.raises(LmforgeError, match="has no val/ shards"):
        run_pretrain(tmp_path, no_val)


def test_a_run_trained_with_another_tokenizer_is_refused(tmp_path, prepared, texts):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, text in enumerate(texts[:20]):
        (raw / f"{i}.txt").write_text(text[::-1])
    run_pretrain(tmp_path, raw)
    with pytest.raises(LmforgeError, match="another tokenizer .* use a new run.name"):
        run_pretrain(tmp_path, prepared)


def test_linked_shards_equal_the_source_and_stay_when_it_is_rewritten(tmp_path, prepared):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "shard_00007.bin").write_bytes(b"stale")
    manifest = link_shards(prepared / "train", dst)
    assert manifest == read_manifest(dst) == read_manifest(prepared / "train")
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.json", *(s["file"] for s in manifest["shards"])]
    first = manifest["shards"][0]["file"]
    original = (dst / first).read_bytes()
    assert original == (prepared / "train" / first).read_bytes()
    src = shutil.copytree(prepared / "train", tmp_path / "src")
    link_shards(src, dst)
    atomic_write(src / first, bytes(len(original)))  # the source rewritten, as data prepare does
    assert (dst / first).read_bytes() == original


def test_prepared_documents_decode_the_kept_text_exactly(prepared, texts):
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    docs = list(prepared_documents(prepared))
    assert len(docs) == read_manifest(prepared / "train")["num_docs"]
    ids = [t for d in docs for t in [*tokenizer.encode(d.text, bos=True), tokenizer.eos_id]]
    assert ids == np.concatenate(shard_arrays(prepared / "train")).tolist()
    assert {d.text for d in docs} <= {normalize(t)[0] for t in texts}
