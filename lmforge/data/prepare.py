"""The data stage: raw documents -> normalized, filtered, deduplicated, scrubbed text -> tokenizer and token shards,
with per-stage statistics, sampled rejects and lineage.

Run: `lmforge data prepare --config configs/data/web.yaml input=DIR output=runs/data/web`, then
`lmforge data stats runs/data/web`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from lmforge.config import check, load_config
from lmforge.data.corpus import FORMATS_HELP, Document, embedded_corpus, read_documents
from lmforge.data.dedup import DedupConfig, deduplicate
from lmforge.data.normalize import normalize
from lmforge.data.quality import CodeQualityConfig, QualityConfig, code_quality_reasons, quality_reasons
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
    """Raw text: "" for the embedded corpus, else a folder or file of .txt, .jsonl, .parquet (optionally .gz)."""
    output: str = "runs/data/prepared"
    """Folder for stats.json, rejects.jsonl, lineage.json, report.md, tokenizer/ and train/ shards."""
    kind: Literal["prose", "code", "auto"] = "auto"
    """Quality rules: prose (Gopher/C4), code (line shape), or auto (code for ids ending in .py, .c, ...)."""
    normalize: bool = True
    """NFC, drop control characters, tidy whitespace (see lmforge/data/normalize.py)."""
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
    docs = list(embedded_corpus() if not cfg.input else read_documents(cfg.input))
    docs_in = len(docs)
    terms = load_terms(cfg.toxicity.wordlist) if cfg.toxicity.wordlist else frozenset()
    stages, rejects, samples = [], [], Counter()

    def record(name: str, kept: list[Document], rejected: list[Rejected]) -> list[Document]:
        stages.append(_stage(name, docs, kept, rejected))
        for doc, reason in rejected:
            if samples[name, reason] < cfg.rejects_sample:
                samples[name, reason] += 1
                rejects.append({"stage": name, "reason": reason, "id": doc.id, "text": doc.text[:REJECT_CHARS]})
        return kept

    docs = record("normalize", *(normalize_docs(docs) if cfg.normalize else (docs, [])))
    docs = record("quality", *filter_docs(docs, lambda d: quality_reason(d, cfg)))
    docs = record("dedup", *dedup_docs(docs, cfg.dedup))
    scrubbed, replaced = scrub_docs(docs, cfg.scrub)
    docs = record("scrub", scrubbed, [])
    stages[-1]["replaced"] = {kind: replaced[kind] for kind in sorted(replaced)}
    docs = record("toxicity", *filter_docs(docs, lambda d: toxicity_reason(d.text, cfg.toxicity, terms)))

    stats = {"input": cfg.input or "<embedded corpus>", "docs_in": docs_in, "docs_out": len(docs), "stages": stages}
    atomic_write(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    atomic_write(out / "rejects.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    atomic_write(out / "report.md", f"# Data preparation: {stats['input']}\n\n{stats_table(stats)}\n")
    if not docs:
        raise LmforgeError(
            f"all {docs_in} documents were removed; see {out / 'report.md'} and {out / 'rejects.jsonl'}, then "
            "loosen the filters in the config"
        )
    tokenizer = Tokenizer.train((d.text for d in docs), cfg.vocab_size)
    tokenizer.save(out / "tokenizer")
    manifest = write_shards(docs, tokenizer, out / "train")
    configs = {
        "normalize": {"enabled": cfg.normalize},
        "quality": {"kind": cfg.kind, "prose": asdict(cfg.quality), "code": asdict(cfg.code_quality)},
        "dedup": asdict(cfg.dedup),
        "scrub": asdict(cfg.scrub),
        "toxicity": asdict(cfg.toxicity),
    }
    lineage = {
        "input": stats["input"],
        "stages": [{**stage, "config": configs[stage["name"]]} for stage in stages],
        "tokenizer": {"path": "tokenizer/tokenizer.json", "vocab_size": cfg.vocab_size, "sha256": tokenizer.sha256},
        "shards": {"path": "train", "total_tokens": manifest["total_tokens"], "num_docs": manifest["num_docs"]},
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
        rows.append(
            f"| {s['name']} | {s['docs_in']} | {s['docs_out']} | {s['bytes_in']} | {s['bytes_out']} | "
            f"{', '.join(notes) or '-'} |"
        )
    rows.append(f"\n{stats['docs_in']} documents in, {stats['docs_out']} kept.")
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
