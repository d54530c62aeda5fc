"""Word-list toxicity filter: drop documents where too many words belong to a blocklist of terms, as in C4's
"bad words" rule (Raffel et al. 2020, section 2.2) but as a ratio rather than a single hit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import check
from lmforge.errors import LmforgeError

_WORD = re.compile(r"\w+(?:['’]\w+)*")


@dataclass
class ToxicityConfig:
    wordlist: str = ""
    """File of blocked terms, one per line (multi-word terms match as phrases); "" turns the filter off."""
    max_ratio: float = 0.01
    """Drop documents in which more than this share of words are part of a blocked term."""

    def validate(self) -> None:
        check(0.0 <= self.max_ratio <= 1.0, f"toxicity.max_ratio={self.max_ratio} must be between 0 and 1")
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


def toxicity_reason(text: str, cfg: ToxicityConfig, terms: frozenset[tuple[str, ...]]) -> str | None:
    """ "toxic_words" when the blocked-term ratio of `text` exceeds cfg.max_ratio, else None."""
    return "toxic_words" if terms and toxic_ratio(text, terms) > cfg.max_ratio else None
