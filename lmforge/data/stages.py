"""One input shard through the per-document stages (read, normalize, language, quality, dedup keys and MinHash
signatures, scrub, toxicity), its survivors spilled to the run's work folder under an atomic done marker. prepare.py
runs the global steps (dedup, split, tokenizer, shards) once over all shards, so neither the engine nor the number of
workers changes the output, and an interrupted run redoes only the shards without a marker."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.data.corpus import Document, embedded_corpus
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
    if cfg.toxicity.wordlist:
        stat = Path(cfg.toxicity.wordlist).stat()
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
    reasons = code_quality_reasons(doc.text, cfg.code_quality) if code else quality_reasons(doc.text, cfg.quality)
    return reasons[0] if reasons else None


@functools.cache
def _identifier() -> Any:
    return load_identifier()  # ~2 s to build: once per worker process, not per shard


def _bytes(docs: list[Document]) -> int:
    return sum(len(d.text.encode()) for d in docs)


def process_shard(task: ShardTask) -> int:
    """Run the per-document stages over one shard and spill the result; returns the shard's index."""
    cfg = task.cfg
    if task.docs is not None:
        items: Iterator[Document | Reject] = iter(task.docs)
    elif task.piece:
        root = Path(task.root)
        items = read_piece(root / task.files[0], root, task.piece, cfg.text_field, cfg.max_doc_bytes)
    else:
        root = Path(task.root)
        items = read_files([root / f for f in task.files], root, cfg.text_field, cfg.max_doc_bytes)
    docs, read_rejects = [], []
    for item in items:
        (read_rejects if isinstance(item, Reject) else docs).append(item)
    removed = [r for r in read_rejects if not r.kept]
    stages: dict[str, dict[str, Any]] = {
        "read": {
            "docs_in": len(docs) + len(removed),
            "docs_out": len(docs),
            "bytes_in": _bytes(docs) + sum(r.nbytes for r in removed),
            "bytes_out": _bytes(docs),
            "removed": dict(Counter(r.reason for r in removed)),
            "repaired": {"invalid_utf8": sum(r.kept for r in read_rejects)},
        }
    }
    rejects: list[dict[str, str]] = []
    samples: Counter = Counter()

    def reject(stage: str, reason: str, doc_id: str, text: str) -> None:
        # The first few per stage and reason; prepare.py keeps the first few of all shards.
        if samples[stage, reason] < cfg.rejects_sample:
            samples[stage, reason] += 1
            rejects.append({"stage": stage, "reason": reason, "id": doc_id, "text": text[:REJECT_CHARS]})

    for r in read_rejects:
        reject("read", r.reason, r.id, r.text)

    def apply(name: str, step: Callable[[Document], tuple[Document, str | None]]) -> None:
        nonlocal docs
        kept, reasons = [], Counter()
        for doc in docs:
            out, reason = step(doc)
            if reason:
                reasons[reason] += 1
                reject(name, reason, doc.id, doc.text)
            else:
                kept.append(out)
        stages[name] = {"docs_in": len(docs), "docs_out": len(kept), "bytes_in": _bytes(docs)}
        stages[name] |= {"bytes_out": _bytes(kept), "removed": dict(reasons)}
        docs = kept

    def normalized(doc: Document) -> tuple[Document, str | None]:
        text, reason = normalize(doc.text)
        return Document(doc.id, text), reason

    apply("normalize", normalized if cfg.normalize else lambda d: (d, None))
    if cfg.langid.enabled:
        apply("langid", lambda d: (d, language_reason(d.text, cfg.langid, _identifier())))
    apply("quality", lambda d: (d, quality_reason(d, cfg)))

    terms = load_terms(cfg.toxicity.wordlist) if cfg.toxicity.wordlist else frozenset()
    scrubbed, replaced, toxic = [], [], []
    for doc in docs:
        text, found = scrub(doc.text, cfg.scrub)
        scrubbed.append(text)
        replaced.append(list(found.values()))
        toxic.append(toxicity_reason(text, cfg.toxicity, terms, task.scorer))
    texts = [d.text for d in docs]
    kinds = [k for k in asdict(cfg.scrub) if getattr(cfg.scrub, k)]  # scrub() counts the enabled kinds, in order
    signatures = minhash_signatures(texts, cfg.dedup) if cfg.dedup.near else np.zeros((len(docs), 0), np.uint32)
    arrays = {
        "keys": np.frombuffer(b"".join(map(exact_key, texts)), np.uint8).reshape(len(docs), 16),
        "signatures": signatures,
        "nbytes": np.array([len(t.encode()) for t in texts], np.int64),
        "nbytes_scrubbed": np.array([len(t.encode()) for t in scrubbed], np.int64),
        "replaced": np.array(replaced, np.int64).reshape(len(docs), len(kinds)),
    }
    spill = "".join(
        json.dumps({"id": d.id, "text": t}, ensure_ascii=False) + "\n" for d, t in zip(docs, scrubbed, strict=True)
    )
    atomic_write(task.path(".jsonl"), spill)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(task.path(".npz"), buf.getvalue())
    marker = {"fingerprint": task.fingerprint, "stages": stages, "rejects": rejects}
    marker |= {"ids": [d.id for d in docs], "toxic": toxic, "scrub_kinds": kinds}
    # The marker goes last: its presence, with this fingerprint, is what says the shard is done.
    atomic_write(task.path(".json"), json.dumps(marker, ensure_ascii=False))
    return task.index


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
