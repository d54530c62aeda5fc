"""A `lmforge data prepare` output as pre-training data: its tokenizer and shards taken into the run folder, and the
run's data lineage (the prepared folder, hashes of its stats and tokenizer, each stage's counts) in data.json."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.corpus import Document
from lmforge.errors import LmforgeError
from lmforge.run import Run
from lmforge.tokenizer import Tokenizer

SPLITS = ("train", "val")


def is_prepared(path: str | Path) -> bool:
    """True for a folder that `lmforge data prepare` wrote to (finished or not): it holds stats.json or lineage.json."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("stats.json", "lineage.json"))


@dataclass
class PreparedData:
    path: Path
    tokenizer: Tokenizer
    stats: dict[str, Any]
    stats_sha256: str
    """sha256 of stats.json's bytes: which filtering produced these shards."""
    manifests: dict[str, dict[str, Any]]
    """The train and val shards' manifests."""


def open_prepared(path: str | Path) -> PreparedData:
    """The tokenizer, stats and shard manifests of a finished `lmforge data prepare` output, checked to agree."""
    from lmforge.data.shards import read_manifest  # torch: only where shards are read

    path = Path(path)
    rerun = f"rerun `lmforge data prepare output={path}`"
    if not (path / "lineage.json").is_file():
        raise LmforgeError(f"{path} is an unfinished `lmforge data prepare` output (lineage.json is missing); {rerun}")
    stats_bytes = (path / "stats.json").read_bytes()
    try:
        stats = json.loads(stats_bytes)
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path / 'stats.json'} is not valid JSON ({e}); {rerun}") from None
    tokenizer = Tokenizer.load(path / "tokenizer")
    manifests = {}
    for split in SPLITS:
        if not (path / split).is_dir():
            raise LmforgeError(
                f"{path} has no {split}/ shards (every kept document went to the other split); {rerun} "
                f"val_fraction=... so that both splits get documents"
            )
        manifests[split] = read_manifest(path / split)
        if manifests[split]["tokenizer_sha256"] != tokenizer.sha256:
            raise LmforgeError(f"{path / split} was tokenized by another tokenizer than {path / 'tokenizer'}; {rerun}")
    return PreparedData(path, tokenizer, stats, hashlib.sha256(stats_bytes).hexdigest(), manifests)


def use_prepared(path: str | Path, vocab_size: int, run: Run) -> tuple[Tokenizer, dict[str, dict[str, Any]]]:
    """Take a prepared folder's tokenizer and train/val shards into the run folder (tokenizer.json, data/train,
    data/val) and write data.json; a rerun finds them in place. Returns the tokenizer and the shards' manifests."""
    from lmforge.data.shards import link_shards, read_manifest

    prep = open_prepared(path)
    if prep.tokenizer.vocab_size != vocab_size:
        raise LmforgeError(
            f"data.path={path} was prepared with a {prep.tokenizer.vocab_size}-token tokenizer but "
            f"model.vocab_size={vocab_size}; set model.vocab_size={prep.tokenizer.vocab_size}, or rerun "
            f"`lmforge data prepare vocab_size={vocab_size}`"
        )
    tok_path = run.file("tokenizer.json")
    if tok_path.exists():
        if Tokenizer.load(tok_path).sha256 != prep.tokenizer.sha256:
            raise LmforgeError(
                f"{tok_path} is another tokenizer than {prep.path / 'tokenizer'}; this run trained on other data, "
                "so use a new run.name"
            )
    else:
        prep.tokenizer.save(run.path)
    for split in SPLITS:
        src, dst = prep.path / split, run.file(f"data/{split}")
        same_folder = dst.exists() and dst.resolve() == src.resolve()  # the speedrun prepares into its run folder
        if not same_folder and (not (dst / "manifest.json").exists() or read_manifest(dst) != prep.manifests[split]):
            link_shards(src, dst)
    summary = data_summary(prep)
    if not run.file("data.json").exists() or run.read_json("data.json") != summary:
        run.write_json("data.json", summary)
    return prep.tokenizer, prep.manifests


def data_lineage(data_path: str, tokenizer: Tokenizer, manifests: dict[str, dict[str, Any]], run: Run) -> dict:
    """What a checkpoint records of the data it was trained on: the prepared folder with the hashes of its stats and
    tokenizer (data.json), or for raw text the source and the tokenizer's hash."""
    if data_path and is_prepared(data_path):
        return run.read_json("data.json")["lineage"]
    return {
        "source": data_path or "embedded: Python standard library",
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "train_tokens": manifests["train"]["total_tokens"],
        "val_tokens": manifests["val"]["total_tokens"],
    }


def data_summary(prep: PreparedData) -> dict[str, Any]:
    """The run's data lineage and one row per data stage: documents and bytes in and kept, and why others went."""
    stages = []
    for s in prep.stats["stages"]:
        notes = [f"{reason} {n}" for reason, n in s.get("removed", {}).items()]
        notes += [f"{kind} replaced {n}" for kind, n in s.get("replaced", {}).items() if n]
        notes += [f"{kind} repaired {n}" for kind, n in s.get("repaired", {}).items() if n]
        stages.append(
            {
                "stage": s["name"],
                "docs_in": s["docs_in"],
                "docs_kept": s["docs_out"],
                "docs_removed": s["docs_in"] - s["docs_out"],
                "bytes_in": s["bytes_in"],
                "bytes_kept": s["bytes_out"],
                "removed": ", ".join(notes) or "-",
            }
        )
    return {
        "lineage": {
            "prepared": str(prep.path.resolve()),
            "input": prep.stats.get("input", ""),
            "stats_sha256": prep.stats_sha256,
            "tokenizer_sha256": prep.tokenizer.sha256,
            "vocab_size": prep.tokenizer.vocab_size,
        },
        "split": {
            "train_docs": prep.manifests["train"]["num_docs"],
            "val_docs": prep.manifests["val"]["num_docs"],
            "train_tokens": prep.manifests["train"]["total_tokens"],
            "val_tokens": prep.manifests["val"]["total_tokens"],
        },
        "stages": stages,
    }


def prepared_documents(path: str | Path, split: str = "train") -> Iterator[Document]:
    """The documents of a prepared folder's split, decoded back from its shards: the filtered, scrubbed text."""
    from lmforge.data.shards import shard_arrays

    prep = open_prepared(path)
    tok = prep.tokenizer
    carry = np.zeros(0, dtype=np.int64)
    n = 0

    def doc(ids: np.ndarray) -> Document:
        body = ids[1:-1] if len(ids) and ids[-1] == tok.eos_id else ids[1:]  # each document is bos, text, eos
        return Document(f"{split}:{n}", tok.decode(body.tolist()))

    # documents run across shard boundaries, so the tail after the last bos waits for the next shard
    for array in shard_arrays(prep.path / split):
        tokens = np.concatenate([carry, np.asarray(array, dtype=np.int64)])
        starts = np.flatnonzero(tokens == tok.bos_id)
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            yield doc(tokens[a:b])
            n += 1
        carry = tokens[starts[-1] :] if len(starts) else tokens
    if len(carry):
        yield doc(carry)
