"""The data stage: raw files -> read leniently, normalized, language-identified, filtered, decontaminated against
benchmark items, deduplicated, scrubbed text -> tokenizer and train/val token shards, with per-stage statistics,
sampled rejects and lineage.

Run: `lmforge data prepare --config configs/data/web.yaml input=DIR output=runs/data/web`, then
`lmforge data stats runs/data/web`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import load_config
from lmforge.data.config import DataPrepConfig
from lmforge.data.corpus import Document, split_docs
from lmforge.data.decontaminate import task_indexes
from lmforge.data.dedup import SignatureShard, band_hashes, sharded_near_duplicate_clusters
from lmforge.data.engines import local, ray_data
from lmforge.data.shards import write_shards
from lmforge.data.stages import REJECT_CHARS, ShardResult, ShardTask, load_shard, plan_shards, process_shard, shard_done
from lmforge.data.stages import spilled as spilled_docs
from lmforge.data.toxicity import Scorer, resolve_scorer
from lmforge.errors import LmforgeError
from lmforge.run import atomic_write
from lmforge.tokenizer import Tokenizer

ENGINES = {
    "local": lambda tasks, cfg: local.run_tasks(process_shard, tasks, cfg.workers),
    "ray": lambda tasks, cfg: ray_data.run_tasks(process_shard, tasks, cfg.ray_address),
}


def _stage(name: str, nbytes_in: np.ndarray, nbytes_out: np.ndarray, keep: np.ndarray, reasons: list) -> dict:
    """Counts of a global stage: documents in (all of nbytes_in), kept (where keep), removed by reason."""
    return {
        "name": name,
        "docs_in": len(keep),
        "docs_out": int(keep.sum()),
        "bytes_in": int(nbytes_in.sum()),
        "bytes_out": int(nbytes_out[keep].sum()),
        "removed": dict(sorted(Counter(r for r in reasons if r).items())),
    }


def merge_shard_stages(results: list[ShardResult], cfg: DataPrepConfig) -> tuple[list[dict], list[dict]]:
    """The per-document stages' counts summed over shards, and their rejects: the first few per stage and reason."""
    stages, rejects, samples = [], [], Counter()
    for name in results[0].stages:
        stage: dict[str, Any] = {"name": name}
        for part in (r.stages[name] for r in results):
            for key, value in part.items():
                if isinstance(value, dict):
                    total = stage.get(key, {})
                    stage[key] = {k: total.get(k, 0) + value.get(k, 0) for k in sorted(total | value)}
                else:
                    stage[key] = stage.get(key, 0) + value
        stages.append(stage)
        for r in (r for result in results for r in result.rejects if r["stage"] == name):
            if samples[name, r["reason"]] < cfg.rejects_sample:
                samples[name, r["reason"]] += 1
                rejects.append(r)
    return stages, rejects


def dedup_reasons(tasks: list[ShardTask], results: list[ShardResult], cfg: DataPrepConfig) -> list[str | None]:
    """exact_duplicate, near_duplicate or None (kept) for each survivor of the quality stage, in input order: the first
    document of each exact group and of each near-duplicate cluster is kept, whatever shard or worker it came from."""
    sizes = [len(r.ids) for r in results]
    n = sum(sizes)
    reasons: list[str | None] = [None] * n
    unique = np.ones(n, dtype=bool)
    if cfg.dedup.exact and n:
        keys = np.concatenate([r.keys for r in results]).view(np.dtype((np.void, 16))).ravel()
        unique[:] = False
        unique[np.unique(keys, return_index=True)[1]] = True
        for i in np.flatnonzero(~unique):
            reasons[i] = "exact_duplicate"
    if cfg.dedup.near and n:
        rest = np.flatnonzero(unique)
        selected = np.split(unique, np.cumsum(sizes)[:-1])
        labels = near_duplicate_labels(tasks, selected, cfg, Path(tasks[0].work) / "dedup")
        for k in np.flatnonzero(labels != np.arange(labels.size)):
            reasons[rest[k]] = "near_duplicate"
    return reasons


def shard_signatures(task: ShardTask, positions: np.ndarray | None = None, at: np.ndarray | None = None) -> np.ndarray:
    """The signatures of the shard's documents, or of those at positions[at]."""
    with np.load(task.path(".npz")) as arrays:
        signatures = arrays["signatures"]
    return signatures if positions is None else signatures[positions[at]]


def near_duplicate_labels(
    tasks: list[ShardTask], selected: list[np.ndarray], cfg: DataPrepConfig, folder: Path
) -> np.ndarray:
    """Near-duplicate cluster labels of the `selected` documents of every shard, in order. The signatures (512 bytes a
    document) stay in the shards' files: each shard's band hashes go to `folder` for the step's duration, then
    sharded_near_duplicate_clusters reads them a band at a time. Loading 200,000 documents' results (5 shards) then
    deduplicating them peaked at 345 MB RSS, 231 MB of it imports; with every signature in memory, 633 MB."""
    bands, rows = cfg.dedup.banding()
    shutil.rmtree(folder, ignore_errors=True)  # a killed run's
    folder.mkdir(parents=True)
    try:
        shards = []
        for task, wanted in zip(tasks, selected, strict=True):
            path = folder / f"bands_{task.index:05d}.npy"
            np.save(path, band_hashes(shard_signatures(task), bands, rows)[:, wanted])  # 128 bytes a row, not 512
            shards.append(SignatureShard(path, partial(shard_signatures, task, np.flatnonzero(wanted))))
        return sharded_near_duplicate_clusters(shards, bands, rows, cfg.dedup.threshold if cfg.dedup.verify else None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def global_stages(
    tasks: list[ShardTask], results: list[ShardResult], cfg: DataPrepConfig
) -> tuple[list[dict], list[str | None]]:
    """The dedup, scrub and toxicity stages' counts, and the reason each survivor of quality was removed (or None)."""
    reasons = dedup_reasons(tasks, results, cfg)
    nbytes = np.concatenate([r.nbytes for r in results])
    scrubbed = np.concatenate([r.nbytes_scrubbed for r in results])
    kept = np.array([r is None for r in reasons], dtype=bool)
    stages = [_stage("dedup", nbytes, nbytes, kept, reasons)]
    stages.append(_stage("scrub", nbytes[kept], scrubbed[kept], np.ones(int(kept.sum()), dtype=bool), []))
    replaced = np.concatenate([r.replaced for r in results])[kept].sum(0).tolist()
    stages[-1]["replaced"] = dict(sorted(zip(results[0].scrub_kinds, replaced, strict=True))) if kept.any() else {}
    toxic = [t for r in results for t in r.toxic]
    for i in np.flatnonzero(kept):
        reasons[i] = toxic[i]
    final = np.array([r is None for r in reasons], dtype=bool)
    stages.append(
        _stage("toxicity", scrubbed[kept], scrubbed[kept], final[kept], [toxic[i] for i in np.flatnonzero(kept)])
    )
    return stages, reasons


def spilled(tasks: list[ShardTask], results: list[ShardResult], wanted: np.ndarray) -> Iterator[tuple[int, Document]]:
    """(index, scrubbed document) of the survivors of quality where `wanted`, streamed from the shards' spill files."""
    offset = 0
    for task, result in zip(tasks, results, strict=True):
        n = len(result.ids)
        if wanted[offset : offset + n].any():
            for k, doc in enumerate(spilled_docs(task)):
                if wanted[offset + k]:
                    yield offset + k, doc
        offset += n


def global_rejects(tasks: list[ShardTask], results: list[ShardResult], reasons: list, cfg: DataPrepConfig) -> list:
    """The first few documents removed per reason by dedup, then by toxicity, with the start of their scrubbed text."""
    ids = [i for r in results for i in r.ids]
    samples, sampled = Counter(), np.zeros(len(reasons), dtype=bool)
    for i, reason in enumerate(reasons):
        if reason and samples[reason] < cfg.rejects_sample:
            samples[reason] += 1
            sampled[i] = True
    texts = {i: doc.text for i, doc in spilled(tasks, results, sampled)}
    rejects = []
    for stage in ("dedup", "toxicity"):
        for i in np.flatnonzero(sampled):
            if (reasons[i] in ("exact_duplicate", "near_duplicate")) == (stage == "dedup"):
                rejects.append({"stage": stage, "reason": reasons[i], "id": ids[i], "text": texts[i][:REJECT_CHARS]})
    return rejects


def main(cfg: DataPrepConfig, scorers: dict[str, Scorer] | None = None) -> dict[str, Any]:
    """Run every stage over the input, write the artifacts into cfg.output and return the stats. `scorers` adds
    named toxicity classifiers to toxicity.SCORERS for this run (see toxicity.classifier)."""
    out = Path(cfg.output)
    work = out / ".work"
    # A run killed mid-write leaves temp files of atomic writes behind; the rerun's output must not hold them.
    for folder in (out, work, out / "tokenizer", out / "train", out / "val"):
        for stale in folder.glob(".*.tmp"):
            stale.unlink()
    # An unreadable task file fails here, once, rather than in every worker.
    task_indexes(tuple(cfg.decontaminate), cfg.decontaminate_ngram)
    tasks = plan_shards(cfg, work, resolve_scorer(cfg.toxicity, scorers))
    # Shards finished by an earlier, interrupted run of the same input and settings are not redone.
    for _ in ENGINES[cfg.engine]([t for t in tasks if not shard_done(t)], cfg):
        pass
    # Without their signatures (not a view, which would keep them), read again by dedup a shard at a time.
    results = [replace(r, signatures=np.empty((len(r.ids), 0), np.uint32)) for r in map(load_shard, tasks)]
    stages, rejects = merge_shard_stages(results, cfg)
    more_stages, reasons = global_stages(tasks, results, cfg)
    stages += more_stages
    rejects += global_rejects(tasks, results, reasons, cfg)
    final = np.array([r is None for r in reasons], dtype=bool)
    kept_ids = [i for r in results for i in r.ids]
    kept_ids = [kept_ids[i] for i in np.flatnonzero(final)]
    val_ids = {d.id for d in split_docs([Document(i, "") for i in kept_ids], cfg.val_fraction)[1]}
    docs_in, docs_out = stages[0]["docs_in"], len(kept_ids)
    stats = {"input": cfg.input or "<embedded corpus>", "docs_in": docs_in, "docs_out": docs_out, "stages": stages}
    stats["split"] = {"train": docs_out - len(val_ids), "val": len(val_ids)}
    atomic_write(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    atomic_write(out / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    atomic_write(out / "report.md", f"# Data preparation: {stats['input']}\n\n{stats_table(stats)}\n")
    if not docs_out:
        shutil.rmtree(work, ignore_errors=True)
        raise LmforgeError(
            f"all {docs_in} documents were removed; see {out / 'report.md'} and {out / 'rejects.jsonl'}, then "
            "loosen the filters in the config"
        )

    def part(name: str) -> Iterator[Document]:
        in_val = name == "val"
        return (doc for _, doc in spilled(tasks, results, final) if (doc.id in val_ids) == in_val)

    # The tokenizer sees only train text, so validation loss is measured on text it was not fitted to.
    tokenizer = Tokenizer.train((d.text for d in part("train")), cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    shards = {}
    for name, count in stats["split"].items():
        if not count:
            shutil.rmtree(out / name, ignore_errors=True)  # a stale val/ from an earlier run must not linger
        else:
            manifest = write_shards(part(name), tokenizer, out / name)
            shards[name] = {"path": name, "total_tokens": manifest["total_tokens"], "num_docs": manifest["num_docs"]}
    configs = {
        "read": {"text_field": cfg.text_field, "max_doc_bytes": cfg.max_doc_bytes},
        "normalize": {"enabled": cfg.normalize},
        "langid": asdict(cfg.langid),
        "quality": {"kind": cfg.kind, "prose": asdict(cfg.quality), "code": asdict(cfg.code_quality)},
        "decontaminate": {
            "ngram": cfg.decontaminate_ngram,
            "tasks": {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in cfg.decontaminate},
        },
        "dedup": asdict(cfg.dedup),
        "scrub": asdict(cfg.scrub),
        "toxicity": asdict(cfg.toxicity),
    }
    lineage = {
        "input": stats["input"],
        "stages": [{**stage, "config": configs[stage["name"]]} for stage in stages],
        "tokenizer": {"path": "tokenizer/tokenizer.json", "vocab_size": cfg.vocab_size, "sha256": tokenizer.sha256},
        "shards": shards,
        "config": asdict(cfg),
    }
    atomic_write(out / "lineage.json", json.dumps(lineage, indent=2) + "\n")
    shutil.rmtree(work)
    return stats


def stats_table(stats: dict[str, Any]) -> str:
    """Markdown table: one row per stage with documents and bytes in and out and removals by reason."""
    rows = ["| stage | docs in | docs kept | bytes in | bytes kept | removed |", "|---|---:|---:|---:|---:|---|"]
    for s in stats["stages"]:
        notes = [f"{reason} {n}" for reason, n in s["removed"].items()]
        notes += [f"{kind} replaced {n}" for kind, n in s.get("replaced", {}).items() if n]
        notes += [f"{kind} repaired {n}" for kind, n in s.get("repaired", {}).items() if n]
        rows.append(
            f"| {s['name']} | {s['docs_in']} | {s['docs_out']} | {s['bytes_in']} | {s['bytes_out']} | "
            f"{', '.join(notes) or '-'} |"
        )
    rows.append(f"\n{stats['docs_in']} documents in, {stats['docs_out']} kept.")
    if "split" in stats:
        rows.append(f"{stats['split']['train']} train, {stats['split']['val']} val.")
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = sub.add_parser("prepare", help="filter, deduplicate and scrub documents, then train a tokenizer and shard")
    p.add_argument("--config", help="YAML file with the data preparation config")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")
    s = sub.add_parser("stats", help="print the per-stage table of a prepared data folder")
    s.add_argument("dir", help="output folder of `lmforge data prepare`")


def command(args: argparse.Namespace) -> None:
    if args.data_command == "prepare":
        cfg = load_config(DataPrepConfig, args.config, args.overrides)
        print(stats_table(main(cfg)))
        print(f"prepared data: {cfg.output}")
        return
    path = Path(args.dir) / "stats.json"
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        raise LmforgeError(f"{path} is missing; run `lmforge data prepare output={args.dir}` first") from None
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); rerun `lmforge data prepare`") from None
    print(stats_table(stats))
