"""The data stage: raw files -> read leniently, normalized, language-identified, filtered, deduplicated, scrubbed text
-> tokenizer and train/val token shards, with per-stage statistics, sampled rejects and lineage.

Run: `lmforge data prepare --config configs/data/web.yaml input=DIR output=runs/data/web`, then
`lmforge data stats runs/data/web`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from lmforge.config import check, load_config
from lmforge.data.corpus import Document, embedded_corpus, split_docs
from lmforge.data.dedup import DedupConfig, deduplicate
from lmforge.data.langid import LangIdConfig, language_reason, load_identifier
from lmforge.data.normalize import normalize
from lmforge.data.quality import CodeQualityConfig, QualityConfig, code_quality_reasons, quality_reasons
from lmforge.data.readers import FORMATS_HELP, Reject, read_lenient
from lmforge.data.scrub import ScrubConfig, scrub
from lmforge.data.shards import write_shards
from lmforge.data.toxicity import ToxicityConfig, load_terms, toxicity_reason
from lmforge.errors import LmforgeError
from lmforge.run import atomic_write
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import BYTE_VOCAB_SIZE

CODE_SUFFIXES = frozenset(
    {".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".java", ".kt", ".scala", ".go", ".rs", ".js", ".ts"}
    | {".rb", ".php", ".lua", ".jl", ".sh", ".sql", ".swift"}
)
REJECT_CHARS = 500

Rejected = tuple[Document, str]  # a removed document and the reason it was removed


@dataclass
class DataPrepConfig:
    input: str = ""
    """Raw text: "" for the embedded corpus, else a folder or file of .txt, .jsonl, .parquet (optionally .gz, .zst)."""
    output: str = "runs/data/prepared"
    """Folder for stats.json, rejects.jsonl, lineage.json, report.md, tokenizer/, train/ and val/ shards."""
    text_field: str = "text"
    """The .jsonl field or .parquet column that holds each document's text."""
    max_doc_bytes: int = 10 << 20
    """Documents (a .jsonl line, a .parquet row, a whole .txt file) larger than this are rejected as too_large."""
    val_fraction: float = 0.01
    """Share of the kept documents written to val/, chosen by a hash of the document id as pre-training does."""
    kind: Literal["prose", "code", "auto"] = "auto"
    """Quality rules: prose (Gopher/C4), code (line shape), or auto (code for ids ending in .py, .c, ...)."""
    normalize: bool = True
    """NFC, drop control characters, tidy whitespace (see lmforge/data/normalize.py)."""
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    code_quality: CodeQualityConfig = field(default_factory=CodeQualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    vocab_size: int = 4096
    """Vocabulary of the BPE tokenizer trained on the kept documents."""
    rejects_sample: int = 20
    """Rejected documents written to rejects.jsonl per stage and reason."""

    def validate(self) -> None:
        check(
            not self.input or Path(self.input).exists(),
            f'input={self.input!r} does not exist; give a folder or file of {FORMATS_HELP}, or "" for the embedded '
            "corpus",
        )
        check(bool(self.output), 'output="" must name a folder for the prepared data')
        check(bool(self.text_field), 'text_field="" must name the field or column that holds the text')
        check(self.max_doc_bytes > 0, f"max_doc_bytes={self.max_doc_bytes} must be > 0")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction={self.val_fraction} must be >= 0 and < 1")
        check(self.vocab_size >= BYTE_VOCAB_SIZE, f"vocab_size={self.vocab_size} must be >= {BYTE_VOCAB_SIZE}")
        check(self.rejects_sample >= 0, f"rejects_sample={self.rejects_sample} must be >= 0")


def is_code(doc: Document, kind: str) -> bool:
    return kind == "code" or (kind == "auto" and PurePosixPath(doc.id).suffix.lower() in CODE_SUFFIXES)


def normalize_docs(docs: list[Document]) -> tuple[list[Document], list[Rejected]]:
    kept, rejected = [], []
    for doc in docs:
        text, reason = normalize(doc.text)
        if reason:
            rejected.append((doc, reason))
        else:
            kept.append(Document(doc.id, text))
    return kept, rejected


def filter_docs(docs: list[Document], reason_of: Callable[[Document], str | None]) -> tuple[list, list[Rejected]]:
    kept, rejected = [], []
    for doc in docs:
        reason = reason_of(doc)
        if reason:
            rejected.append((doc, reason))
        else:
            kept.append(doc)
    return kept, rejected


def quality_reason(doc: Document, cfg: DataPrepConfig) -> str | None:
    """The first rule `doc` fails (each removed document is counted once, under its first reason)."""
    code = is_code(doc, cfg.kind)
    reasons = code_quality_reasons(doc.text, cfg.code_quality) if code else quality_reasons(doc.text, cfg.quality)
    return reasons[0] if reasons else None


def dedup_docs(docs: list[Document], cfg: DedupConfig) -> tuple[list[Document], list[Rejected]]:
    # Two passes (exact, then near over the exact survivors, as deduplicate does in one) name each removal's reason.
    rejected = []
    for reason, pass_cfg in (
        ("exact_duplicate", replace(cfg, near=False)),
        ("near_duplicate", replace(cfg, exact=False)),
    ):
        kept, _ = deduplicate(docs, pass_cfg)
        survivors = {id(d) for d in kept}
        rejected += [(d, reason) for d in docs if id(d) not in survivors]
        docs = kept
    return docs, rejected


def scrub_docs(docs: list[Document], cfg: ScrubConfig) -> tuple[list[Document], Counter]:
    out, counts = [], Counter()
    for doc in docs:
        text, found = scrub(doc.text, cfg)
        counts.update(found)
        out.append(Document(doc.id, text))
    return out, counts


def read_docs(cfg: DataPrepConfig) -> tuple[list[Document], list[Reject]]:
    """Every readable document of cfg.input, and the records rejected or repaired on the way."""
    docs, rejects = [], []
    for item in embedded_corpus() if not cfg.input else read_lenient(cfg.input, cfg.text_field, cfg.max_doc_bytes):
        (rejects if isinstance(item, Reject) else docs).append(item)
    return docs, rejects


def _bytes(docs: list[Document]) -> int:
    return sum(len(d.text.encode()) for d in docs)


def _stage(name: str, docs_in: list[Document], kept: list[Document], rejected: list[Rejected]) -> dict[str, Any]:
    assert len(docs_in) == len(kept) + len(rejected), name
    return {
        "name": name,
        "docs_in": len(docs_in),
        "docs_out": len(kept),
        "bytes_in": _bytes(docs_in),
        "bytes_out": _bytes(kept),
        "removed": dict(sorted(Counter(reason for _, reason in rejected).items())),
    }


def main(cfg: DataPrepConfig) -> dict[str, Any]:
    """Run every stage over the input, write the artifacts into cfg.output and return the stats."""
    out = Path(cfg.output)
    docs, read_rejects = read_docs(cfg)
    removed = [r for r in read_rejects if not r.kept]
    docs_in = len(docs) + len(removed)
    terms = load_terms(cfg.toxicity.wordlist) if cfg.toxicity.wordlist else frozenset()
    identifier = load_identifier() if cfg.langid.enabled else None
    stages, rejects, samples = [], [], Counter()

    def record(name: str, kept: list[Document], rejected: list[Rejected]) -> list[Document]:
        stages.append(_stage(name, docs, kept, rejected))
        for doc, reason in rejected:
            if samples[name, reason] < cfg.rejects_sample:
                samples[name, reason] += 1
                rejects.append({"stage": name, "reason": reason, "id": doc.id, "text": doc.text[:REJECT_CHARS]})
        return kept

    read_stage = {"name": "read", "docs_in": docs_in, "docs_out": len(docs)}
    read_stage |= {"bytes_in": _bytes(docs) + sum(r.nbytes for r in removed), "bytes_out": _bytes(docs)}
    read_stage["removed"] = dict(sorted(Counter(r.reason for r in removed).items()))
    read_stage["repaired"] = {"invalid_utf8": sum(r.kept for r in read_rejects)}
    stages.append(read_stage)
    for r in read_rejects:
        if samples["read", r.reason] < cfg.rejects_sample:
            samples["read", r.reason] += 1
            rejects.append({"stage": "read", "reason": r.reason, "id": r.id, "text": r.text[:REJECT_CHARS]})
    docs = record("normalize", *(normalize_docs(docs) if cfg.normalize else (docs, [])))
    if identifier is not None:
        docs = record("langid", *filter_docs(docs, lambda d: language_reason(d.text, cfg.langid, identifier)))
    docs = record("quality", *filter_docs(docs, lambda d: quality_reason(d, cfg)))
    docs = record("dedup", *dedup_docs(docs, cfg.dedup))
    scrubbed, replaced = scrub_docs(docs, cfg.scrub)
    docs = record("scrub", scrubbed, [])
    stages[-1]["replaced"] = {kind: replaced[kind] for kind in sorted(replaced)}
    docs = record("toxicity", *filter_docs(docs, lambda d: toxicity_reason(d.text, cfg.toxicity, terms)))

    train, val = split_docs(docs, cfg.val_fraction)
    stats = {"input": cfg.input or "<embedded corpus>", "docs_in": docs_in, "docs_out": len(docs), "stages": stages}
    stats["split"] = {"train": len(train), "val": len(val)}
    atomic_write(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    atomic_write(out / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    atomic_write(out / "report.md", f"# Data preparation: {stats['input']}\n\n{stats_table(stats)}\n")
    if not docs:
        raise LmforgeError(
            f"all {docs_in} documents were removed; see {out / 'report.md'} and {out / 'rejects.jsonl'}, then "
            "loosen the filters in the config"
        )
    # The tokenizer sees only train text, so validation loss is measured on text it was not fitted to.
    tokenizer = Tokenizer.train((d.text for d in train), cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    shards = {}
    for name, part in (("train", train), ("val", val)):
        if not part:
            shutil.rmtree(out / name, ignore_errors=True)  # a stale val/ from an earlier run must not linger
        else:
            manifest = write_shards(part, tokenizer, out / name)
            shards[name] = {"path": name, "total_tokens": manifest["total_tokens"], "num_docs": manifest["num_docs"]}
    configs = {
        "read": {"text_field": cfg.text_field, "max_doc_bytes": cfg.max_doc_bytes},
        "normalize": {"enabled": cfg.normalize},
        "langid": asdict(cfg.langid),
        "quality": {"kind": cfg.kind, "prose": asdict(cfg.quality), "code": asdict(cfg.code_quality)},
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
