"""The global dedup step of `data prepare` over many shards, with band hashes on disk: the same removals as
clustering every signature in memory, and no temporary files left, a killed run's included."""

import json
from dataclasses import replace
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

from lmforge.config import load_config
from lmforge.data.dedup import near_duplicate_clusters
from lmforge.data.prepare import DataPrepConfig, dedup_reasons
from lmforge.data.stages import load_shard, plan_shards, process_shard


def planted_corpus(root: Path) -> int:
    """JSONL files of 300 documents of 120 common pydoc words, then 60 near copies (1 or 2 words replaced), 15 exact
    copies and 30 distant ones (40 replaced); returns the number of near copies."""
    words = [w for t in topics.values() for w in t.split() if w.isalpha() and w.islower()]
    vocab, counts = np.unique(words, return_counts=True)
    rng = np.random.default_rng(0)
    docs = [list(rng.choice(vocab, 120, p=counts / counts.sum())) for _ in range(300)]
    for edits in [*rng.integers(1, 3, 60), *[0] * 15, *[40] * 30]:
        copy = list(docs[rng.integers(300)])
        for pos in rng.choice(120, edits, replace=False):
            copy[pos] = vocab[rng.integers(len(vocab))]
        docs.insert(int(rng.integers(len(docs) + 1)), copy)
    for k in range(0, len(docs), 100):
        (root / f"part_{k:04d}.jsonl").write_text(
            "".join(json.dumps({"text": " ".join(d)}) + "\n" for d in docs[k : k + 100])
        )
    return 60


def in_memory_reasons(results, cfg: DataPrepConfig) -> list:
    """The step as it was: every signature concatenated and clustered at once."""
    keys = np.concatenate([r.keys for r in results]).view(np.dtype((np.void, 16))).ravel()
    first = np.zeros(len(keys), dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    reasons = [None if f else "exact_duplicate" for f in first]
    rest = np.flatnonzero(first)
    signatures = np.concatenate([r.signatures for r in results])[rest]
    labels = near_duplicate_clusters(signatures, *cfg.dedup.banding(), cfg.dedup.threshold)
    for k, label in enumerate(labels):
        if label != k:
            reasons[rest[k]] = "near_duplicate"
    return reasons


def test_on_disk_dedup_removes_what_in_memory_clustering_does(tmp_path):
    (tmp_path / "in").mkdir()
    near = planted_corpus(tmp_path / "in")
    overrides = [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "shard_bytes=40000"]
    cfg = load_config(DataPrepConfig, Path(__file__).resolve().parents[2] / "configs/data/web.yaml", overrides)
    tasks = plan_shards(cfg, tmp_path / "out/.work")
    for task in tasks:
        process_shard(task)
    results = [load_shard(t) for t in tasks]
    assert len(tasks) >= 5 and sum(len(r.ids) for r in results) == 405
    expected = in_memory_reasons(results, cfg)
    # what a run killed in the middle of the step leaves behind
    stale = tmp_path / "out/.work/dedup"
    stale.mkdir()
    (stale / f"bands_{len(tasks) - 1:05d}.npy").write_bytes(b"\x93NUMPY half written")
    (stale / "bands_99999.npy").write_bytes(b"")
    reasons = dedup_reasons(tasks, [replace(r, signatures=r.signatures[:, :0]) for r in results], cfg)
    assert reasons == expected
    assert reasons.count("exact_duplicate") == 15 and near - 3 <= reasons.count("near_duplicate") <= near
    assert not stale.exists()
