"""The pipeline over many shards: the same output whatever the sharding, the worker count or the engine (local
processes or Ray), and an interrupted run resumes from its finished shards."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from lmforge.config import load_config
from lmforge.data.prepare import DataPrepConfig, main
from lmforge.data.stages import plan_shards, process_shard
from lmforge.tokenizer import Tokenizer

LDNOOBW = Path(__file__).resolve().parents[1] / "fixtures/ldnoobw_en.txt"
SCORED: list[str] = []


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The 79 pydoc topics dealt over 8 JSONL files, then planted in later files: an exact duplicate of "class" (in
    part_3), a near duplicate of "calls" (in part_2), PII and a toxic document; plus a malformed line and an empty
    file."""
    root = tmp_path_factory.mktemp("web")
    parts = [[topics[k] for k in sorted(topics)][i::8] for i in range(8)]
    near = topics["calls"].split(" ")
    near[100] = "zeppelin"
    parts[4].append(topics["class"].upper())
    parts[6].append(" ".join(near))
    # words reversed: text that passes the quality rules without resembling its topic
    parts[5].append(" ".join(topics["dict"].split()[::-1]) + " Mail jane.doe@example.com today.")
    parts[7].append(" ".join(topics["with"].split()[::-1]).replace(" the ", " the bastard "))
    for i, rows in enumerate(parts):
        lines = [json.dumps({"text": t}) for t in rows] + (["{not json"] if i == 3 else [])
        (root / f"part_{i}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "zz_empty.txt").write_text("")
    return root


def config(corpus: Path, out: Path, *extra: str) -> DataPrepConfig:
    overrides = [f"input={corpus}", f"output={out}", "vocab_size=300", f"toxicity.wordlist={LDNOOBW}", *extra]
    return load_config(DataPrepConfig, Path(__file__).resolve().parents[2] / "configs/data/web.yaml", overrides)


def files(out: Path) -> dict[str, bytes]:
    """Every output file; lineage.json without the settings that say where and how the run ran."""
    found = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    lineage = json.loads(found.pop("lineage.json"))
    for key in ("output", "workers", "engine", "shard_bytes"):
        lineage["config"].pop(key)
    return found | {"lineage.json": json.dumps(lineage).encode()}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One shard, one process: what every other engine, sharding and worker count must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    stats = main(config(corpus, out, "workers=1"))
    return out, stats


def shard_text(out: Path) -> str:
    tokenizer = Tokenizer.load(out / "tokenizer")
    text = ""
    for part in ("train", "val"):
        manifest = json.loads((out / part / "manifest.json").read_text())
        ids = np.concatenate([np.fromfile(out / part / s["file"], dtype=manifest["dtype"]) for s in manifest["shards"]])
        text += tokenizer.decode(ids.tolist(), skip_special=True)
    return text


def test_reference_run_removes_what_was_planted(reference):
    out, stats = reference
    stages = {s["name"]: s for s in stats["stages"]}
    assert stages["read"]["removed"] == {"empty_file": 1, "malformed_json": 1}
    assert stages["scrub"]["replaced"]["email"] == 1 and stages["toxicity"]["removed"] == {"toxic_words": 1}
    rejects = {(r["reason"], r["id"]) for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    planted = {("exact_duplicate", "part_4.jsonl:11"), ("near_duplicate", "part_6.jsonl:11")}
    planted |= {("toxic_words", "part_7.jsonl:10")}
    assert planted <= rejects  # (the topics themselves repeat a few paragraphs too)
    assert "zeppelin" not in shard_text(out) and not (out / ".work").exists()


@pytest.mark.parametrize("shard_bytes", [1, 20_000])
def test_workers_and_shards_do_not_change_the_output(corpus, reference, tmp_path, shard_bytes):
    # Files cut into pieces of whole lines (one line each, or ~20 KB): each planted duplicate and its original are
    # in different shards, signed by different worker processes, and still found by the global LSH step.
    cfg = config(corpus, tmp_path, "workers=2", f"shard_bytes={shard_bytes}")
    tasks = plan_shards(cfg, tmp_path)
    assert len(tasks) > 2 * len(list(corpus.iterdir())) and sum(t.piece is not None for t in tasks) > 9
    stats = main(cfg)
    assert stats == reference[1]
    assert files(tmp_path) == files(reference[0])


def crash_on_pii(text: str) -> float:
    if "<EMAIL>" in text:  # the scrubbed PII document, the last line of part_5.jsonl
        raise RuntimeError("simulated crash")
    return 0.0


def count_calls(text: str) -> float:
    SCORED.append(text)
    return 0.0


def test_interrupted_run_resumes_from_finished_shards(corpus, tmp_path):
    cfg = config(corpus, tmp_path / "resumed", "workers=1", "shard_bytes=20000", "toxicity.classifier=probe")
    crash = max(t.index for t in plan_shards(cfg, tmp_path) if "part_5.jsonl" in t.files)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(cfg, scorers={"probe": crash_on_pii})
    done = sorted(p.name for p in (tmp_path / "resumed/.work").glob("*.json"))
    assert done == [f"shard_{i:05d}.json" for i in range(crash)]  # the shards before the crash, each with a marker
    SCORED.clear()
    main(cfg, scorers={"probe": count_calls})
    resumed = list(SCORED)
    SCORED.clear()
    main(replace(cfg, output=str(tmp_path / "whole")), scorers={"probe": count_calls})
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    # The resumed run scored only the documents of the shards from the crash on: nothing finished was redone.
    assert 0 < len(resumed) < len(SCORED) and resumed == SCORED[-len(resumed) :]


def no_score(text: str) -> float:
    return 0.0


def test_crash_in_a_worker_process_stops_the_pool_and_resumes(corpus, tmp_path):
    # The crash surfaces in this process, the other worker is terminated mid-shard, and the rerun redoes the rest.
    cfg = config(corpus, tmp_path / "resumed", "workers=2", "shard_bytes=20000", "toxicity.classifier=probe")
    crash = max(t.index for t in plan_shards(cfg, tmp_path) if "part_5.jsonl" in t.files)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(cfg, scorers={"probe": crash_on_pii})
    assert f"shard_{crash:05d}.json" not in {p.name for p in (tmp_path / "resumed/.work").iterdir()}
    main(cfg, scorers={"probe": no_score})
    main(replace(cfg, output=str(tmp_path / "whole"), workers=1), scorers={"probe": no_score})
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")


def flag_exceptions(text: str) -> float:
    return 1.0 if "exception" in text.lower() else 0.0


def test_classifier_hook_removes_high_scores(corpus, reference, tmp_path):
    stats = main(config(corpus, tmp_path, "toxicity.classifier=flagger"), scorers={"flagger": flag_exceptions})
    removed = stats["stages"][-1]["removed"]
    assert removed["toxic_words"] == 1 and removed["toxic_score"] > 0
    assert stats["docs_out"] == reference[1]["docs_out"] - removed["toxic_score"]
    assert "exception" in shard_text(reference[0]).lower() and "exception" not in shard_text(tmp_path).lower()


def test_ray_engine_matches_local(corpus, reference, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Four shards of 2-3 files, one Ray block each: "calls" (part_2) and its near duplicate (part_6) are signed
        # on different blocks. Fewer, larger shards than elsewhere, as each Ray worker takes seconds to start.
        cfg = config(corpus, tmp_path, "engine=ray", "shard_bytes=120000")
        shard_of = {f: t.index for t in plan_shards(cfg, tmp_path) for f in t.files}
        assert max(shard_of.values()) == 3 and shard_of["part_2.jsonl"] != shard_of["part_6.jsonl"]
        stats = main(cfg)
    finally:
        ray.shutdown()
    assert stats == reference[1]
    assert files(tmp_path) == files(reference[0])


def test_compressed_files_stream_in_batches_to_the_same_output(corpus, reference, tmp_path):
    # a gzip file cannot be cut at byte offsets: it is one task, read a shard's worth (here ~20 KB) at a time
    packed = tmp_path / "packed"
    packed.mkdir()
    for file in corpus.iterdir():
        (packed / f"{file.name}.gz").write_bytes(gzip.compress(file.read_bytes(), mtime=0))
    out = tmp_path / "out"
    stats = main(config(packed, out, "workers=1", "shard_bytes=20000"))
    # every stage removed and kept the same documents and bytes (ids end in .gz, so the train/val split differs)
    assert stats["stages"] == reference[1]["stages"]


def test_a_large_compressed_file_is_held_a_batch_at_a_time(tmp_path):
    """Peak Python memory while one task processes a ~700 KB gzip file: bounded by the batch, not by the file
    (held whole, it takes ~25 bytes per byte of text)."""
    texts = [topics[k] for k in sorted(topics) if len(topics[k]) > 2000]
    rows = [json.dumps({"text": f"{i} {texts[i % len(texts)]}"}) for i in range(60)]
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress("\n".join(rows).encode()))

    def peak(shard_bytes: int) -> int:
        cfg = replace(config(tmp_path / "big.jsonl.gz", tmp_path / "out"), shard_bytes=shard_bytes)
        (task,) = plan_shards(cfg, tmp_path / f"work_{shard_bytes}")
        tracemalloc.start()
        process_shard(task)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    whole, batched = peak(64 << 20), peak(20_000)
    assert batched < 0.4 * whole, (batched, whole)


PREPARE = (
    "import sys, argparse; from lmforge.data.prepare import add_arguments, command; p = argparse.ArgumentParser(); "
)
PREPARE += "add_arguments(p); command(p.parse_args(sys.argv[1:]))"  # what `lmforge data prepare` runs, lighter to start


def kill_when(args: list[str], appears: Path) -> None:
    """Start `data prepare`, SIGKILL it (its workers are not told) as soon as `appears` exists, and wait for it."""
    # niced, so that on a busy machine this process wakes to see the file before the run has moved far past it
    proc = subprocess.Popen(
        [sys.executable, "-c", PREPARE, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.nice(10),
    )
    while not appears.exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, f"finished before the kill point {appears.name}: {proc.stderr.read()}"


def test_sigkill_at_any_point_then_the_same_command_gives_the_same_bytes(corpus, reference, tmp_path):
    out = tmp_path / "out"
    args = ["prepare", "--config", str(Path(__file__).resolve().parents[2] / "configs/data/web.yaml")]
    args += [f"input={corpus}", f"output={out}", "vocab_size=300", f"toxicity.wordlist={LDNOOBW}"]
    args += ["workers=2", "shard_bytes=30000"]
    kill_when(args, out / ".work/shard_00002.json")  # while workers write shards
    kill_when(args, out / "stats.json")  # in the global steps: tokenizer, token shards, lineage
    subprocess.run([sys.executable, "-c", PREPARE, *args], check=True, stdout=subprocess.DEVNULL)
    assert files(out) == files(reference[0])
    assert not list(out.rglob("*.tmp")) and not (out / ".work").exists()


def test_a_one_line_document_of_megabytes_is_counted_in_bounded_memory(tmp_path):
    """A single JSONL line of ~2 MB, under max_doc_bytes: counted (too_many_words) with a peak of a few bytes per
    character (it was ~50: a piece per word in normalize, every word listed by the quality rules)."""
    rng = np.random.default_rng(0)
    text = " ".join(np.array(["the", "of", "and", "river", "garden", "window", "market"])[rng.integers(0, 7, 400_000)])
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    cfg = replace(config(tmp_path / "one.jsonl", tmp_path / "out"), max_doc_bytes=8 << 20)
    (task,) = plan_shards(cfg, tmp_path / "work")
    tracemalloc.start()
    process_shard(task)
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stages = json.loads(task.path(".json").read_text())["stages"]
    assert stages["read"]["docs_out"] == 1 and stages["quality"]["removed"] == {"too_many_words": 1}
    assert top < 6 * len(text), top / len(text)
