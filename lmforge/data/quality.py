"""Heuristic quality filters: the Gopher rules for web text (Rae et al. 2021, appendix A.1), two C4 rules (Raffel
et al. 2020, section 2.2) and line-shape rules for source code (as in The Stack, Kocetkov et al. 2022)."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import numpy as np

from lmforge.config import check

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's eight
_BULLETS = ("•", "●", "○", "▪", "▫", "■", "□", "‣", "◦", "–", "-", "*")
_ELLIPSES = ("...", "…")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")


@dataclass
class QualityConfig:
    min_words: int = 50
    """Gopher: drop documents with fewer words."""
    max_words: int = 100_000
    """Gopher: drop documents with more words."""
    min_mean_word_len: float = 3.0
    """Gopher: mean word length (punctuation stripped) at least this."""
    max_mean_word_len: float = 10.0
    """Gopher: mean word length at most this."""
    max_symbol_word_ratio: float = 0.1
    """Gopher: at most this many '#' and ellipses per word."""
    max_bullet_line_frac: float = 0.9
    """Gopher: at most this share of lines starting with a bullet."""
    max_ellipsis_line_frac: float = 0.3
    """Gopher: at most this share of lines ending with an ellipsis."""
    min_alpha_word_frac: float = 0.8
    """Gopher: at least this share of words contain a letter."""
    min_stop_words: int = 2
    """Gopher: at least this many occurrences of the eight stop words."""
    min_terminal_punct_line_frac: float = 0.0
    """C4 keeps only lines ending in terminal punctuation; here a document-level share, 0 turns it off."""
    max_dup_line_frac: float = 0.3
    """Gopher: at most this share of lines repeat an earlier line."""
    max_dup_line_char_frac: float = 0.2
    """Gopher: at most this share of characters in repeated lines."""
    max_dup_para_frac: float = 0.3
    """Gopher: at most this share of paragraphs repeat an earlier paragraph."""
    max_dup_para_char_frac: float = 0.2
    """Gopher: at most this share of characters in repeated paragraphs."""
    max_top_ngram_frac: tuple[float, ...] = (0.20, 0.18, 0.16)
    """Gopher: for n = 2, 3, 4, the most frequent n-gram covers at most this share of word characters."""
    max_dup_ngram_frac: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)
    """Gopher: for n = 5..10, repeated n-grams cover at most this share of word characters."""
    lorem_ipsum: bool = True
    """C4: drop documents containing "lorem ipsum"."""

    def validate(self) -> None:
        for name in ("min_words", "max_words", "min_stop_words"):
            check(getattr(self, name) >= 0, f"quality.{name}={getattr(self, name)} must be >= 0")
        check(
            self.min_words <= self.max_words,
            f"quality.min_words={self.min_words} must be <= quality.max_words={self.max_words}",
        )
        check(
            0 <= self.min_mean_word_len <= self.max_mean_word_len,
            f"quality.min_mean_word_len={self.min_mean_word_len} must be >= 0 and <= "
            f"quality.max_mean_word_len={self.max_mean_word_len}",
        )
        check(
            self.max_symbol_word_ratio >= 0, f"quality.max_symbol_word_ratio={self.max_symbol_word_ratio} must be >= 0"
        )
        for name in (
            "max_bullet_line_frac",
            "max_ellipsis_line_frac",
            "min_alpha_word_frac",
            "min_terminal_punct_line_frac",
            "max_dup_line_frac",
            "max_dup_line_char_frac",
            "max_dup_para_frac",
            "max_dup_para_char_frac",
        ):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"quality.{name}={value} must be between 0 and 1")
        for name, count in (("max_top_ngram_frac", 3), ("max_dup_ngram_frac", 6)):
            values = getattr(self, name)
            check(
                len(values) == count and all(0.0 <= v <= 1.0 for v in values),
                f"quality.{name}={list(values)} must be {count} fractions between 0 and 1",
            )


def _dup_fracs(chunks: list[str]) -> tuple[float, float]:
    """Share of chunks, and of their characters, that repeat an earlier chunk."""
    if not chunks:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for c in chunks:
        if c in seen:
            dup += 1
            dup_chars += len(c)
        seen.add(c)
    return dup / len(chunks), dup_chars / sum(len(c) for c in chunks)


def ngram_fracs(words: list[str], total: int, top_ns: range, dup_ns: range) -> tuple[list[float], list[float]]:
    """Gopher's n-gram repetition measures, as shares of the `total` word characters: for each n in top_ns, the
    characters of the most frequent n-gram times its count (ties go to the first seen); for each n in dup_ns, the
    characters of words covered by any n-gram that occurs more than once (each word counted once)."""
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    chars = np.concatenate([[0], np.cumsum(lengths)])
    top, dup = [], []
    grams = ids  # n-gram ids, exact (no hashing): n-1-gram id and next word, renumbered densely by np.unique
    for n in range(2, max(top_ns.stop, dup_ns.stop)):
        if len(words) < n:
            top += [0.0] * (n in top_ns)
            dup += [0.0] * (n in dup_ns)
            continue
        grams = grams[:-1] * len(words) + ids[n - 1 :]
        _, first, grams, counts = np.unique(grams, return_index=True, return_inverse=True, return_counts=True)
        if n in top_ns:
            best = first[counts == counts.max()].min()
            top.append(float(counts.max() * (chars[best + n] - chars[best]) / total))
        if n in dup_ns:
            starts = np.flatnonzero(counts[grams] > 1)
            edges = np.bincount(starts, minlength=len(words) + 1) - np.bincount(starts + n, minlength=len(words) + 1)
            dup.append(float(lengths[np.cumsum(edges)[:-1] > 0].sum() / total))
    return top, dup


def quality_reasons(text: str, cfg: QualityConfig) -> list[str]:
    """Names of the rules `text` fails; an empty list means keep it."""
    reasons: list[str] = []
    tokens = text.split()
    words = [w for w in (t.strip(string.punctuation + "“”‘’…").lower() for t in tokens) if w]
    if len(tokens) < cfg.min_words:
        reasons.append("too_few_words")
    if len(tokens) > cfg.max_words:
        reasons.append("too_many_words")
    if not tokens:
        return reasons
    mean_len = sum(map(len, words)) / len(words) if words else 0.0
    if mean_len < cfg.min_mean_word_len:
        reasons.append("short_words")
    if mean_len > cfg.max_mean_word_len:
        reasons.append("long_words")
    symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
    if symbols / len(tokens) > cfg.max_symbol_word_ratio:
        reasons.append("symbols")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if sum(line.startswith(_BULLETS) for line in lines) / len(lines) > cfg.max_bullet_line_frac:
        reasons.append("bullet_lines")
    if sum(line.endswith(_ELLIPSES) for line in lines) / len(lines) > cfg.max_ellipsis_line_frac:
        reasons.append("ellipsis_lines")
    if sum(any(c.isalpha() for c in t) for t in tokens) / len(tokens) < cfg.min_alpha_word_frac:
        reasons.append("few_alpha_words")
    if sum(w in STOP_WORDS for w in words) < cfg.min_stop_words:
        reasons.append("no_stop_words")
    if sum(line.endswith(_TERMINAL) for line in lines) / len(lines) < cfg.min_terminal_punct_line_frac:
        reasons.append("no_terminal_punct")
    line_frac, line_chars = _dup_fracs(lines)
    if line_frac > cfg.max_dup_line_frac:
        reasons.append("dup_lines")
    if line_chars > cfg.max_dup_line_char_frac:
        reasons.append("dup_line_chars")
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    para_frac, para_chars = _dup_fracs(paras)
    if para_frac > cfg.max_dup_para_frac:
        reasons.append("dup_paras")
    if para_chars > cfg.max_dup_para_char_frac:
        reasons.append("dup_para_chars")
    total = sum(map(len, words))
    if total:
        top, dup = ngram_fracs(words, total, range(2, 5), range(5, 11))
        for n, (frac, limit) in enumerate(zip(top, cfg.max_top_ngram_frac, strict=True), start=2):
            if frac > limit:
                reasons.append(f"top_{n}gram")
        for n, (frac, limit) in enumerate(zip(dup, cfg.max_dup_ngram_frac, strict=True), start=5):
            if frac > limit:
                reasons.append(f"dup_{n}gram")
    if cfg.lorem_ipsum and "lorem ipsum" in text.lower():
        reasons.append("lorem_ipsum")
    return reasons


@dataclass
class CodeQualityConfig:
    max_line_length: int = 1000
    """Drop files with any line longer than this (minified or data blobs)."""
    max_mean_line_length: int = 100
    """Drop files whose mean line length exceeds this."""
    min_alnum_frac: float = 0.25
    """Drop files where fewer than this share of characters are letters or digits (encoded data)."""
    autogenerated_markers: list[str] = field(
        default_factory=lambda: ["auto-generated", "autogenerated", "do not edit", "generated by"]
    )
    """Drop files whose first 5 lines (500 characters) contain one of these, case-insensitively."""

    def validate(self) -> None:
        for name in ("max_line_length", "max_mean_line_length"):
            check(getattr(self, name) > 0, f"code_quality.{name}={getattr(self, name)} must be > 0")
        check(
            0.0 <= self.min_alnum_frac <= 1.0,
            f"code_quality.min_alnum_frac={self.min_alnum_frac} must be between 0 and 1",
        )
        check(
            all(isinstance(m, str) and m for m in self.autogenerated_markers),
            f"code_quality.autogenerated_markers={self.autogenerated_markers!r} must be non-empty strings",
        )


def code_quality_reasons(text: str, cfg: CodeQualityConfig) -> list[str]:
    """Names of the code rules `text` fails; an empty list means keep it."""
    lines = text.splitlines()
    if not text.strip():
        return ["empty"]
    reasons: list[str] = []
    if max(map(len, lines)) > cfg.max_line_length:
        reasons.append("long_line")
    if sum(map(len, lines)) / len(lines) > cfg.max_mean_line_length:
        reasons.append("long_mean_line")
    if sum(c.isalnum() for c in text) / len(text) < cfg.min_alnum_frac:
        reasons.append("low_alnum")
    head = "\n".join(lines[:5])[:500].lower()
    if any(m.lower() in head for m in cfg.autogenerated_markers):
        reasons.append("autogenerated")
    return reasons
