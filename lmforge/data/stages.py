"""One input shard through the per-document stages (read, normalize, language, quality, decontamination, dedup keys
and MinHash signatures, scrub, toxicity), its survivors spilled to the run's work folder under an atomic done marker.
prepare.py runs the global steps (dedup, split, tokenizer, shards) once over all shards, so neither the engine nor the
number of workers changes the output, and an interrupted run redoes only the shards without a marker."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.data.corpus import Document, embedded_corpus
from lmforge.data.decontaminate import overlap_reason, task_indexes
from lmforge.data.dedup import exact_key, minhash_signatures
from lmforge.data.langid import language_reason, load_identifier
from lmforge.data.normalize import normalize
from lmforge.data.quality import code_quality_reasons, quality_reasons
from lmforge.data.readers import Piece, Reject, input_files, jsonl_pieces, read_files, read_piece, splittable
from lmforge.data.scrub import scrub
from lmforge.data.toxicity import Scorer, load_terms, toxicity_reason
from lmforge.run import atomic_write

if TYPE_CHECKING:
    from lmforge.data.config import DataPrepConfig

CODE_SUFFIXES = frozenset(
    {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".java", ".kt", ".scala", ".go", ".rs", ".js", ".ts"}
    | {".rb", ".php", ".lua", ".jl", ".sh", ".sql", ".swift"}
)
REJECT_CHARS = 500
_WORDS = re.compile(r"\S+")
EMBEDDED_SHARD_DOCS = 64  # the embedded corpus (630 documents, 9.6 MB) in ~10 shards
# Settings that do not change what a shard computes: a rerun that differs only in these resumes finished shards.
_GLOBAL_KEYS = ("output", "engine", "workers", "ray_address", "val_fraction", "vocab_size")


@dataclass
class ShardTask:
    index: int
    work: str
    """Folder of the run's spill files and done markers."""
    cfg: DataPrepConfig
    fingerprint: str
    """Hash of the shard's inputs and of the settings that shape its result; a marker with another one is stale."""
    root: str = ""
    files: list[str] = field(default_factory=list)
    """Input files of this shard, relative to root."""
    piece: Piece | None = None
    """The bytes and first line number of the one JSONL file of this shard, for a file larger than a shard."""
    docs: list[Document] | None = None
    """The embedded corpus travels inside its tasks instead of as files."""
    scorer: Scorer | None = None

    def path(self, suffix: str) -> Path:
        return Path(self.work) / f"shard_{self.index:05d}{suffix}"


@dataclass
class ShardResult:
    """What the global steps need of one finished shard: per-stage counts and rejects so far, and per survivor of the
    quality stage its id, dedup key, signature, sizes before and after scrubbing, replacements and toxicity verdict."""

    stages: dict[str, dict[str, Any]]
    rejects: list[dict[str, str]]
    ids: list[str]
    toxic: list[str | None]
    scrub_kinds: list[str]
    keys: np.ndarray  # (n, 16) uint8
    signatures: np.ndarray  # (n, num_perm) uint32, (n, 0) when near-dedup is off
    nbytes: np.ndarray  # (n,) int64
    nbytes_scrubbed: np.ndarray  # (n,) int64
    replaced: np.ndarray  # (n, len(scrub_kinds)) int64


def plan_shards(cfg: DataPrepConfig, work: Path, scorer: Scorer | None = None) -> list[ShardTask]:
    """The input cut into shards: consecutive files (in reading order) of about cfg.shard_bytes each, a JSONL file
    larger than that cut into runs of whole lines, or runs of EMBEDDED_SHARD_DOCS documents of the embedded corpus."""
    settings = json.dumps({k: v for k, v in asdict(cfg).items() if k not in _GLOBAL_KEYS}, sort_keys=True)
    for path in filter(None, [cfg.toxicity.wordlist, *cfg.decontaminate]):
        stat = Path(path).stat()
        settings += f"|{stat.st_size}|{stat.st_mtime_ns}"
    tasks = []

    def add(what: str, **kwargs: Any) -> None:
        fingerprint = hashlib.sha256(f"{settings}|{what}".encode()).hexdigest()
        tasks.append(ShardTask(len(tasks), str(work), cfg, fingerprint, scorer=scorer, **kwargs))

    if not cfg.input:
        corpus = embedded_corpus()
        while docs := list(islice(corpus, EMBEDDED_SHARD_DOCS)):
            digest = hashlib.sha256()
            for d in docs:
                digest.update(f"{d.id}\0{d.text}\0".encode())
            add(digest.hexdigest(), docs=docs)
        return tasks
    files, root = input_files(cfg.input)
    group: list[tuple[str, int, int]] = []
    group_bytes = 0
    for i, file in enumerate(files):
        try:
            stat = file.stat()
            entry = (file.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns)
        except OSError:  # read_files reports it as unreadable
            entry = (file.relative_to(root).as_posix(), 0, 0)
        try:
            pieces = jsonl_pieces(file, cfg.shard_bytes) if entry[1] > cfg.shard_bytes and splittable(file) else []
        except OSError:
            pieces = []
        if len(pieces) > 1:  # a file larger than a shard: a shard per run of whole lines, in order
            if group:
                add(json.dumps(group), root=str(root), files=[rel for rel, _, _ in group])
                group, group_bytes = [], 0
            for piece in pieces:
                add(json.dumps([entry, piece]), root=str(root), files=[entry[0]], piece=piece)
            continue
        group.append(entry)
        group_bytes += entry[1]
        if group_bytes >= cfg.shard_bytes or i == len(files) - 1:
            add(json.dumps(group), root=str(root), files=[rel for rel, _, _ in group])
            group, group_bytes = [], 0
    return tasks


def is_code(doc: Document, kind: str) -> bool:
    return kind == "code" or (kind == "auto" and PurePosixPath(doc.id).suffix.lower() in CODE_SUFFIXES)


def quality_reason(doc: Document, cfg: DataPrepConfig) -> str | None:
    """The first rule `doc` fails (each removed document is counted once, under its first reason)."""
    code = is_code(doc, cfg.kind)
    if not code and len(doc.text) > 2 * cfg.quality.max_words and _more_words(doc.text, cfg.quality.max_words):
        return "too_many_words"  # the first reason the rules would give, without a list of every word (~100 B each)
    reasons = code_quality_reasons(doc.text, cfg.code_quality) if code else quality_reasons(doc.text, cfg.quality)
    return reasons[0] if reasons else None


def _more_words(text: str, limit: int) -> bool:
    """Whether `text` has more than `limit` words as str.split() cuts them (regex \\s is the same whitespace)."""
    return sum(1 for _ in islice(_WORDS.finditer(text), limit + 1)) > limit


@functools.cache
def _identifier() -> Any:
    return load_identifier()  # ~2 s to build: once per worker process, not per shard


def _bytes(docs: list[Document]) -> int:
    return sum(len(d.text.encode()) for d in docs)


class _StageCounts:
    """Per-stage documents and bytes in and out and removals by reason, summed over a shard's batches, in stage
    order; and the first few rejects per stage and reason."""

    def __init__(self, rejects_sample: int):
        self.stages: dict[str, dict[str, Any]] = {}
        self.repaired = 0  # documents kept with invalid UTF-8 replaced
        self.rejects: list[dict[str, str]] = []
        self.samples: Counter = Counter()
        self.rejects_sample = rejects_sample

    def add(self, name: str, docs_in: int, docs_out: int, bytes_in: int, bytes_out: int, removed: Counter) -> None:
        stage = self.stages.setdefault(
            name, {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "removed": Counter()}
        )
        stage["docs_in"] += docs_in
        stage["docs_out"] += docs_out
        stage["bytes_in"] += bytes_in
        stage["bytes_out"] += bytes_out
        stage["removed"].update(removed)

    def reject(self, stage: str, reason: str, doc_id: str, text: str) -> None:
        # The first few per stage and reason; prepare.py keeps the first few of all shards.
        if self.samples[stage, reason] < self.rejects_sample:
            self.samples[stage, reason] += 1
            self.rejects.append({"stage": stage, "reason": reason, "id": doc_id, "text": text[:REJECT_CHARS]})

    def as_dict(self) -> dict[str, dict[str, Any]]:
        out = {name: {**stage, "removed": dict(stage["removed"])} for name, stage in self.stages.items()}
        out["read"]["repaired"] = {"invalid_utf8": self.repaired}
        return out


def _items(task: ShardTask) -> Iterator[Document | Reject]:
    cfg = task.cfg
    if task.docs is not None:
        return iter(task.docs)
    root = Path(task.root)
    if task.piece:
        return read_piece(root / task.files[0], root, task.piece, cfg.text_field, cfg.max_doc_bytes)
    return read_files([root / f for f in task.files], root, cfg.text_field, cfg.max_doc_bytes)


def _batches(items: Iterator[Document | Reject], max_bytes: int) -> Iterator[list[Document | Reject]]:
    """Consecutive items holding about max_bytes of text each: a compressed or Parquet file, which is one task
    however large, is processed a shard's worth at a time."""
    batch, size, yielded = [], 0, False
    for item in items:
        batch.append(item)
        size += len(item.text) if isinstance(item, Document) else 0
        if size >= max_bytes:
            yield batch
            batch, size, yielded = [], 0, True
    if batch or not yielded:  # an empty shard still reports its stages, with zeros
        yield batch


def process_shard(task: ShardTask) -> int:
    """Run the per-document stages over one shard, a batch of about cfg.shard_bytes at a time, and spill the result;
    returns the shard's index. Memory holds one batch plus ~600 bytes per surviving document."""
    cfg = task.cfg
    counts = _StageCounts(cfg.rejects_sample)
    terms = load_terms(cfg.toxicity.wordlist) if cfg.toxicity.wordlist else frozenset()
    kinds = [k for k in asdict(cfg.scrub) if getattr(cfg.scrub, k)]  # scrub() counts the enabled kinds, in order
    ids, toxic, arrays = [], [], []
    spill = task.path(".jsonl")
    tmp = spill.with_name(f".{spill.name}.{os.getpid()}.tmp")  # one per process: never two writers of one file
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w", encoding="utf-8") as out:
        for batch in _batches(_items(task), cfg.shard_bytes):
            docs = _filter(batch, cfg, counts)
            scrubbed, replaced = [], []
            for doc in docs:
                text, found = scrub(doc.text, cfg.scrub)
                scrubbed.append(text)
                replaced.append(list(found.values()))
                toxic.append(toxicity_reason(text, cfg.toxicity, terms, task.scorer))
            texts = [d.text for d in docs]
            signatures = minhash_signatures(texts, cfg.dedup) if cfg.dedup.near else np.zeros((len(docs), 0), np.uint32)
            arrays.append(
                {
                    "keys": np.frombuffer(b"".join(map(exact_key, texts)), np.uint8).reshape(len(docs), 16),
                    "signatures": signatures,
                    "nbytes": np.array([len(t.encode()) for t in texts], np.int64),
                    "nbytes_scrubbed": np.array([len(t.encode()) for t in scrubbed], np.int64),
                    "replaced": np.array(replaced, np.int64).reshape(len(docs), len(kinds)),
                }
            )
            ids += [d.id for d in docs]
            for d, t in zip(docs, scrubbed, strict=True):
                out.write(json.dumps({"id": d.id, "text": t}, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(spill)  # a whole spill or none, like atomic_write
    buf = io.BytesIO()
    np.savez(buf, **{name: np.concatenate([a[name] for a in arrays]) for name in arrays[0]})
    atomic_write(task.path(".npz"), buf.getvalue())
    marker = {"fingerprint": task.fingerprint, "stages": counts.as_dict(), "rejects": counts.rejects}
    marker |= {"ids": ids, "toxic": toxic, "scrub_kinds": kinds}
    # The marker goes last: its presence, with this fingerprint, is what says the shard is done.
    atomic_write(task.path(".json"), json.dumps(marker, ensure_ascii=False))
    return task.index


def _filter(batch: list[Document | Reject], cfg: DataPrepConfig, counts: _StageCounts) -> list[Document]:
    """One batch through read, normalize, language, quality and decontamination; returns the survivors."""
    docs, read_rejects = [], []
    for item in batch:
        (read_rejects if isinstance(item, Reject) else docs).append(item)
    removed = [r for r in read_rejects if not r.kept]
    counts.add(
        "read",
        len(docs) + len(removed),
        len(docs),
        _bytes(docs) + sum(r.nbytes for r in removed),
        _bytes(docs),
        Counter(r.reason for r in removed),
    )
    counts.repaired += sum(r.kept for r in read_rejects)
    for r in read_rejects:
        counts.reject("read", r.reason, r.id, r.text)

    def apply(name: str, step: Callable[[Document], tuple[Document, str | None]]) -> None:
        nonlocal docs
        kept, reasons = [], Counter()
        for doc in docs:
            out, reason = step(doc)
            if reason:
                reasons[reason] += 1
                counts.reject(name, reason, doc.id, doc.text)
            else:
                kept.append(out)
        counts.add(name, len(docs), len(kept), _bytes(docs), _bytes(kept), reasons)
        docs = kept

    def normalized(doc: Document) -> tuple[Document, str | None]:
        text, reason = normalize(doc.text)
        return Document(doc.id, text), reason

    apply("normalize", normalized if cfg.normalize else lambda d: (d, None))
    if cfg.langid.enabled:
        apply("langid", lambda d: (d, language_reason(d.text, cfg.langid, _identifier())))
    apply("quality", lambda d: (d, quality_reason(d, cfg)))
    if cfg.decontaminate:
        n = cfg.decontaminate_ngram
        indexes = task_indexes(tuple(cfg.decontaminate), n)
        apply("decontaminate", lambda d: (d, overlap_reason(d.text, indexes, n)))
    return docs


def shard_done(task: ShardTask) -> bool:
    try:
        marker = json.loads(task.path(".json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("fingerprint") == task.fingerprint and task.path(".npz").is_file()


def load_shard(task: ShardTask) -> ShardResult:
    marker = json.loads(task.path(".json").read_text())
    with np.load(task.path(".npz")) as arrays:
        loaded = {name: arrays[name] for name in arrays.files}
    fields = ("stages", "rejects", "ids", "toxic", "scrub_kinds")
    return ShardResult(**{name: marker[name] for name in fields}, **loaded)


def spilled(task: ShardTask) -> Iterator[Document]:
    """The shard's survivors of the quality stage, scrubbed, in input order."""
    with task.path(".jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield Document(row["id"], row["text"])
