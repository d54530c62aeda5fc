"""Toxicity filter: drop documents where too many words belong to a blocklist of terms, as in C4's "bad words" rule
(Raffel et al. 2020, section 2.2) but as a ratio rather than a single hit, or whose classifier score is too high."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import check
from lmforge.errors import LmforgeError

_WORD = re.compile(r"\w+(?:['’]\w+)*")

Scorer = Callable[[str], float]
"""A classifier: text -> probability that it is toxic (0..1). Under engine=local with workers > 1 it is pickled to
the worker processes, so it must be a module-level function (or another picklable callable)."""

# Classifiers that toxicity.classifier can name. None ships: every good one needs model weights, which lmforge does
# not download; add one here, or pass scorers={"name": fn} to lmforge.data.prepare.main.
SCORERS: dict[str, Scorer] = {}


@dataclass
class ToxicityConfig:
    wordlist: str = ""
    """File of blocked terms, one per line (multi-word terms match as phrases); "" turns the filter off."""
    max_ratio: float = 0.01
    """Drop documents in which more than this share of words are part of a blocked term."""
    classifier: str = ""
    """Name of a scorer in toxicity.SCORERS or passed to prepare.main(scorers=...); "" turns the classifier off."""
    max_score: float = 0.5
    """Drop documents whose classifier score exceeds this."""

    def validate(self) -> None:
        check(0.0 <= self.max_ratio <= 1.0, f"toxicity.max_ratio={self.max_ratio} must be between 0 and 1")
        check(0.0 <= self.max_score <= 1.0, f"toxicity.max_score={self.max_score} must be between 0 and 1")
        check(
            not self.wordlist or Path(self.wordlist).is_file(),
            f'toxicity.wordlist={self.wordlist!r} is not a file; give a file of terms, one per line, or "" to turn '
            "the filter off",
        )


def load_terms(path: str | Path) -> frozenset[tuple[str, ...]]:
    """Blocked terms of a word-list file as lowercased word tuples; blank lines and # comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LmforgeError(f"toxicity word list {path} cannot be read ({e}); give a UTF-8 file of terms") from None
    terms = (tuple(_WORD.findall(line.lower())) for line in lines if not line.lstrip().startswith("#"))
    return frozenset(t for t in terms if t)


def toxic_ratio(text: str, terms: frozenset[tuple[str, ...]]) -> float:
    """Share of the words of `text` covered by a blocked term (whole words, case-insensitive)."""
    words = _WORD.findall(text.lower())
    if not words or not terms:
        return 0.0
    lengths = sorted({len(t) for t in terms})
    covered = bytearray(len(words))
    for i in range(len(words)):
        for n in lengths:
            if i + n <= len(words) and tuple(words[i : i + n]) in terms:
                covered[i : i + n] = b"\x01" * n
    return sum(covered) / len(words)


def resolve_scorer(cfg: ToxicityConfig, scorers: dict[str, Scorer] | None = None) -> Scorer | None:
    """The classifier cfg.classifier names, from `scorers` or SCORERS; None when it is off."""
    if not cfg.classifier:
        return None
    known = {**SCORERS, **(scorers or {})}
    if cfg.classifier not in known:
        choices = ", ".join(sorted(known)) or "none registered"
        raise LmforgeError(
            f"toxicity.classifier={cfg.classifier!r} is not a known scorer (choices: {choices}); add it to "
            'lmforge.data.toxicity.SCORERS or pass scorers={"name": fn} to lmforge.data.prepare.main'
        )
    return known[cfg.classifier]


def toxicity_reason(
    text: str, cfg: ToxicityConfig, terms: frozenset[tuple[str, ...]], scorer: Scorer | None = None
) -> str | None:
    """ "toxic_words" when the blocked-term ratio of `text` exceeds cfg.max_ratio, "toxic_score" when the classifier
    scores it above cfg.max_score, else None."""
    if terms and toxic_ratio(text, terms) > cfg.max_ratio:
        return "toxic_words"
    return "toxic_score" if scorer is not None and scorer(text) > cfg.max_score else None
