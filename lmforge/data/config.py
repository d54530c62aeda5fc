"""The data preparation config: what to read, every stage's settings, and the engine that runs them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.config import check
from lmforge.data.decontaminate import TASK_FORMATS
from lmforge.data.dedup import DedupConfig
from lmforge.data.langid import LangIdConfig
from lmforge.data.quality import CodeQualityConfig, QualityConfig
from lmforge.data.readers import FORMATS_HELP
from lmforge.data.scrub import ScrubConfig
from lmforge.data.toxicity import ToxicityConfig
from lmforge.tokenizer.bpe import BYTE_VOCAB_SIZE


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
    decontaminate: list[str] = field(default_factory=list)
    """Task files (.jsonl, .json, .csv; every string field of an item counts): documents sharing a word n-gram with
    any item are removed, counted per file in the "decontaminate" stage."""
    decontaminate_ngram: int = 13
    """Words per n-gram of decontamination, on lowercased words without punctuation (GPT-3 used 13)."""
    vocab_size: int = 4096
    """Vocabulary of the BPE tokenizer trained on the kept documents."""
    rejects_sample: int = 20
    """Rejected documents written to rejects.jsonl per stage and reason."""
    engine: Literal["local", "ray"] = "local"
    """Where the per-document stages run: local worker processes, or Ray Data (`pip install 'ray[data]'`)."""
    workers: int = 0
    """Worker processes of the local engine; 0 uses every core."""
    ray_address: str = ""
    """Ray cluster to join with engine=ray ("auto", "ray://host:10001"); "" starts a local Ray instance."""
    shard_bytes: int = 64 << 20
    """Input files are grouped into shards of about this many bytes: the unit of work, of memory and of resuming."""

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
        check(self.workers >= 0, f"workers={self.workers} must be >= 0 (0 uses every core)")
        check(self.shard_bytes > 0, f"shard_bytes={self.shard_bytes} must be > 0")
        check(self.decontaminate_ngram >= 1, f"decontaminate_ngram={self.decontaminate_ngram} must be >= 1")
        for path in self.decontaminate:
            check(
                Path(path).is_file() and Path(path).suffix in TASK_FORMATS,
                f"decontaminate entry {path!r} is not a {', '.join(TASK_FORMATS)} file; give task files of items",
            )
