"""Exact and near-duplicate document removal: MinHash signatures (Broder, 1997) over word shingles, banded into LSH
buckets (Indyk & Motwani, 1998; Leskovec et al., Mining of Massive Datasets, ch. 3)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import check
from lmforge.data.corpus import Document

_MAX32 = np.uint64((1 << 32) - 1)
_PAIRS = 8192  # candidate pairs compared at a time: ~9 MB of rows
_CHUNK = 2048  # shingles per block: a (2048, 128) block stays in cache; 1024 and 4096 were 20-40% slower


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalized text (lowercased, whitespace collapsed) repeats an earlier one."""
    near: bool = True
    """Drop documents whose MinHash-estimated Jaccard similarity to another reaches `threshold`."""
    shingle_size: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """MinHash permutations (signature length); the Jaccard estimate's standard error is ~0.5/sqrt(num_perm)."""
    threshold: float = 0.8
    """Jaccard similarity at which two documents count as near-duplicates."""
    bands: int = 0
    """LSH bands; 0 with rows=0 derives both from `threshold`."""
    rows: int = 0
    """Signature rows per LSH band; 0 with bands=0 derives both from `threshold`."""
    verify: bool = True
    """Keep an LSH candidate pair only if its estimated Jaccard similarity reaches `threshold`."""
    seed: int = 1
    """Seed of the MinHash permutations."""

    def validate(self) -> None:
        check(0.0 < self.threshold < 1.0, f"dedup.threshold={self.threshold} must be between 0 and 1 (exclusive)")
        check(self.shingle_size >= 1, f"dedup.shingle_size={self.shingle_size} must be >= 1 (words per shingle)")
        check(self.num_perm >= 2, f"dedup.num_perm={self.num_perm} must be >= 2")
        check(
            (self.bands == 0) == (self.rows == 0) and self.bands >= 0 and self.rows >= 0,
            f"dedup.bands={self.bands} and dedup.rows={self.rows}: give both > 0, or both 0 to derive them",
        )
        check(
            self.bands * self.rows <= self.num_perm,
            f"dedup.bands*dedup.rows={self.bands * self.rows} must be <= dedup.num_perm={self.num_perm}",
        )

    def banding(self) -> tuple[int, int]:
        if self.bands:
            return self.bands, self.rows
        # verified, a false candidate costs one signature comparison, a missed pair a duplicate kept: weigh misses 19:1
        # (at 0.8 and 128 permutations: 16 bands of 8 catch 99.7% of pairs at Jaccard 0.86, against 75% for the
        # balanced 9 of 13 that unverified LSH needs, as datasketch uses)
        fn_weight = 0.95 if self.verify else 0.5
        return optimal_banding(self.threshold, self.num_perm, 1 - fn_weight, fn_weight)


def optimal_banding(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted areas of false positives below and false negatives above `threshold`
    under the LSH S-curve 1-(1-s^r)^b, as datasketch's _optimal_param does, integrated with Simpson's rule."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]

    def area(lo: float, hi: float, false_negative: bool) -> np.ndarray:
        s = np.linspace(lo, hi, 2001)
        p = 1 - (1 - s**r) ** b
        y = 1 - p if false_negative else p
        w = np.ones(s.size)
        w[1:-1:2], w[2:-1:2] = 4, 2
        return (y * w).sum(1) * (hi - lo) / (3 * (s.size - 1))

    error = fp_weight * area(0.0, threshold, False) + fn_weight * area(threshold, 1.0, True)
    best = pairs[int(np.argmin(error))]  # argmin takes the first minimum, like datasketch's strict '<' scan
    return int(best[0]), int(best[1])


# Bytes that str.split() treats as whitespace in ASCII text; other text is re-spaced in Python first.
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True
_BASE = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_BATCH_BYTES = 1 << 20  # text hashed per batch: temporaries are ~40 bytes per byte of text
_WINDOW_CHARS = 1 << 16  # a document over _BATCH_BYTES is signed in windows of this size (its block buffer is
# 512 bytes per shingle, ~85 bytes per character, whole documents at a time)
_SPACE_CHAR = re.compile(r"\s")  # the whitespace str.split() cuts at


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _word_hashes(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of each document's lowercased words (as str.split() cuts them), concatenated, and each
    document's word count. Words are hashed in numpy, all at once: a polynomial hash of their bytes from prefix sums
    (the sum over a word's bytes b_i * BASE^i, shifted to its start by BASE^-start), then mixed."""
    encoded = [(t if t.isascii() else " ".join(t.split())).lower().encode() for t in docs]
    data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    space = _SPACE[data]
    word = ~space
    starts = np.flatnonzero(word & np.r_[True, space[:-1]])
    ends = np.flatnonzero(word & np.r_[space[1:], True]) + 1
    powers = np.full(data.size + 1, _BASE, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)  # wraps mod 2^64, as intended
    inverse = np.full(data.size + 1, _BASE_INV, dtype=np.uint64)
    inverse[0] = 1
    np.cumprod(inverse, out=inverse)
    prefix = np.zeros(data.size + 1, dtype=np.uint64)
    np.cumsum(data * powers[:-1], out=prefix[1:])
    hashes = _mix((prefix[ends] - prefix[starts]) * inverse[starts] + (ends - starts).astype(np.uint64))
    doc_ends = np.cumsum([len(e) + 1 for e in encoded])
    counts = np.diff(np.searchsorted(starts, doc_ends), prepend=0)
    return hashes, counts


def _shingle_hashes(docs: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each document's word shingles, concatenated, and each document's shingle count (>= 1)."""
    tokens, lengths = _word_hashes(docs)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    counts = np.maximum(lengths - size + 1, 1)
    # A document shorter than one shingle is one shingle of all its words: its window is cut at the document's end.
    first = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    end = np.repeat(starts + lengths, counts)
    padded = np.concatenate([tokens, np.zeros(size, dtype=np.uint64)])
    h = np.full(first.size, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for i in range(size):
        word = np.where(first + i < end, padded[np.minimum(first + i, padded.size - 1)], np.uint64(0))
        h = (h ^ word) * np.uint64(0x100000001B3)  # FNV-style: order-sensitive, so "a b" and "b a" differ
        h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser, so the low 32 bits depend on every word
    h ^= h >> np.uint64(32)
    return (h & _MAX32).astype(np.uint32), counts


def minhash_signatures(docs: list[str], cfg: DedupConfig) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures of lowercased word shingles, documents signed in batches of ~1 MB."""
    gen = np.random.RandomState(cfg.seed)
    a = gen.randint(0, 1 << 32, size=cfg.num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = gen.randint(0, 1 << 32, size=cfg.num_perm, dtype=np.uint64).astype(np.uint32)
    sig = np.empty((len(docs), cfg.num_perm), dtype=np.uint32)
    start = 0
    while start < len(docs):
        if len(docs[start]) > _BATCH_BYTES:  # the minimum over windows that share every shingle: the same signature
            windows = _windows(docs[start], cfg.shingle_size, _WINDOW_CHARS)
            sig[start] = np.minimum.reduce([_sign([w], cfg.shingle_size, a, b)[0] for w in windows])
            start += 1
            continue
        stop, nbytes = start, 0
        while stop < len(docs) and nbytes < _BATCH_BYTES and len(docs[stop]) <= _BATCH_BYTES:
            nbytes += len(docs[stop])
            stop += 1
        sig[start:stop] = _sign(docs[start:stop], cfg.shingle_size, a, b)
        start = stop
    return sig


def _blocks(text: str, chars: int) -> Iterator[str]:
    """`text` in pieces of about `chars` characters, each cut at whitespace, so that no word spans two pieces."""
    start = 0
    while start < len(text):
        space = _SPACE_CHAR.search(text, start + chars)
        end = space.start() if space else len(text)
        yield text[start:end]
        start = end


def _windows(text: str, size: int, chars: int) -> Iterator[str]:
    """Overlapping runs of the words of `text` (each starting with the last size-1 words of the one before) that hold
    every shingle of `size` words between them and no other, a run of about `chars` characters at a time."""
    words: list[str] = []
    emitted = False
    for block in _blocks(text, chars):
        words += block.split()
        if len(words) >= size:  # a shorter run would be signed as one short shingle the whole text does not have
            yield " ".join(words)
            words, emitted = words[len(words) - size + 1 :], True
    if not emitted:
        yield " ".join(words)


def _sign(docs: list[str], size: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    hashes, counts = _shingle_hashes(docs, size)
    sig = np.empty((len(docs), a.size), dtype=np.uint32)
    ends = np.cumsum(counts)
    firsts = ends - counts
    # Reused buffers and in-place ops: allocating each block's temporaries made signing 2x slower.
    buf = np.empty((max(_CHUNK, int(counts.max())), a.size), dtype=np.uint32)
    doc, start = 0, 0
    while doc < len(docs):
        # Whole documents per block, so that min-reduction never spans two blocks.
        last = max(int(np.searchsorted(ends, start + _CHUNK, side="right")), doc + 1)
        stop = int(ends[last - 1])
        v = buf[: stop - start]
        # a*x + b mod 2^32 with odd a: a permutation of the 32-bit shingle hashes, which are already well mixed, so
        # their minima behave like those of random permutations. Two uint32 passes took 0.16 s where datasketch's
        # (a*x + b) mod (2^61 - 1) in uint64 took 0.37 s (5,000 docs of 200 words, 128 permutations).
        np.multiply(hashes[start:stop, None], a, out=v)
        v += b
        sig[doc:last] = np.minimum.reduceat(v, firsts[doc:last] - start, axis=0)
        doc, start = last, stop
    return sig


def near_duplicate_clusters(signatures: np.ndarray, bands: int, rows: int, threshold: float | None = None) -> list[int]:
    """A cluster id per document (the smallest index in its cluster): documents sharing all `rows` values of any band
    are linked, and if `threshold` is given only when their estimated Jaccard similarity reaches it."""
    n, num_perm = signatures.shape
    assert bands * rows <= num_perm, (bands, rows, num_perm)
    sig = np.ascontiguousarray(signatures)
    # Each bucket links its members to the one with the smallest signature, not the first by position, so that
    # verified clusters do not depend on document order.
    rank = np.empty(n, dtype=np.int64)
    rank[np.lexsort(sig.T[::-1])] = np.arange(n)
    left, right = [], []
    for band in range(bands):
        rows_view = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows])
        keys = np.unique(rows_view.view(np.dtype((np.void, rows_view.dtype.itemsize * rows))), return_inverse=True)[1]
        order = np.lexsort((rank, keys.ravel()))
        sorted_keys = keys.ravel()[order]
        new = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        rep = order[np.flatnonzero(new)[np.cumsum(new) - 1]]
        left.append(rep[~new])
        right.append(order[~new])
    i = np.concatenate(left) if left else np.zeros(0, dtype=np.int64)
    j = np.concatenate(right) if right else np.zeros(0, dtype=np.int64)
    pair = np.unique(i * n + j)  # a pair linked in several bands is checked once
    i, j = pair // n, pair % n
    if threshold is not None and i.size:
        # A block of pairs at a time: all at once took ~1.1 KB a pair, and near-copies share most of 16 bands.
        keep = np.concatenate(
            [(sig[i[k : k + _PAIRS]] == sig[j[k : k + _PAIRS]]).mean(1) >= threshold for k in range(0, i.size, _PAIRS)]
        )
        i, j = i[keep], j[keep]
    # Connected components by min-label propagation with pointer jumping: a few vectorised rounds, not a Python loop.
    labels = np.arange(n)
    while i.size:
        low = np.minimum(labels[i], labels[j])
        before = labels.copy()
        np.minimum.at(labels, i, low)
        np.minimum.at(labels, j, low)
        labels = labels[labels]
        if np.array_equal(labels, before):
            break
    return labels.tolist()


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(bands, N) uint64: a hash of each document's `rows` signature values in each band, 8 bytes where the values
    take 4*rows. Equal bands hash equal; unequal ones rarely collide, and a collision only adds a candidate."""
    n = signatures.shape[0]
    hashes = np.empty((bands, n), dtype=np.uint64)
    for band in range(bands):
        h = np.full(n, 0x9E3779B97F4A7C15, dtype=np.uint64)
        for col in range(band * rows, (band + 1) * rows):
            h = (h ^ signatures[:, col]) * _BASE
            h ^= h >> np.uint64(29)
        hashes[band] = _mix(h)
    return hashes


@dataclass
class SignatureShard:
    """One shard's documents in a sharded near-dedup: their band hashes on disk, their signatures read when asked."""

    band_hashes: Path
    """.npy file of the (bands, n) uint64 array band_hashes() gives for the shard's n documents."""
    signatures: Callable[[np.ndarray], np.ndarray]
    """Loads the (len(positions), num_perm) signatures of the documents at the given positions of the shard."""


def sharded_near_duplicate_clusters(
    shards: Sequence[SignatureShard], bands: int, rows: int, threshold: float | None = None
) -> np.ndarray:
    """near_duplicate_clusters() over the documents of every shard in order, the same labels, in ~40 bytes a document
    plus the signatures of the candidates (4*num_perm bytes each). One band at a time, every document's hash is read
    from disk and sorted; a document whose hash another shares is a candidate. Only candidates can be linked, and every
    member of a bucket is one, so clustering the candidates alone (ranks, buckets and checks among them as among all)
    gives every link; each shard's candidates' signatures are read once."""
    sizes = [np.load(s.band_hashes, mmap_mode="r").shape[1] for s in shards]
    n = sum(sizes)
    labels = np.arange(n)
    if not n:
        return labels
    candidate = np.zeros(n, dtype=bool)
    for band in range(bands):
        h = np.concatenate([np.load(s.band_hashes, mmap_mode="r")[band] for s in shards])
        order = np.argsort(h)
        h = h[order]
        shared = h[1:] == h[:-1]
        del h
        candidate[order[1:][shared]] = True
        candidate[order[:-1][shared]] = True
    found = np.flatnonzero(candidate)
    if not found.size:
        return labels
    per_shard = np.split(found, np.searchsorted(found, np.cumsum(sizes)[:-1]))
    offsets = np.cumsum(sizes) - sizes
    sig, filled = None, 0  # filled a shard at a time: concatenating parts would hold the candidates' twice
    for shard, idx, start in zip(shards, per_shard, offsets, strict=True):
        if idx.size:
            part = shard.signatures(idx - start)
            if sig is None:
                sig = np.empty((found.size, part.shape[1]), dtype=part.dtype)
            sig[filled : filled + idx.size] = part
            filled += idx.size
    labels[found] = found[near_duplicate_clusters(sig, bands, rows, threshold)]
    return labels


def exact_key(text: str) -> bytes:
    """16-byte hash of the text lowercased with whitespace collapsed: equal keys are exact duplicates."""
    if len(text) <= _BATCH_BYTES:
        return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()
    digest, sep = hashlib.blake2b(digest_size=16), b""  # the same hash, a block at a time, without a list of every word
    for block in _blocks(text, _WINDOW_CHARS):
        if words := block.lower().split():
            digest.update(sep + " ".join(words).encode())
            sep = b" "
    return digest.digest()


def deduplicate(docs: list[Document], cfg: DedupConfig) -> tuple[list[Document], dict]:
    """The first document of each exact-duplicate group, then of each near-duplicate cluster, in input order."""
    kept, seen = [], set()
    for doc in docs:
        if cfg.exact:
            key = exact_key(doc.text)
            if key in seen:
                continue
            seen.add(key)
        kept.append(doc)
    exact_removed = len(docs) - len(kept)
    if cfg.near and kept:
        bands, rows = cfg.banding()
        labels = near_duplicate_clusters(
            minhash_signatures([d.text for d in kept], cfg), bands, rows, cfg.threshold if cfg.verify else None
        )
        kept = [d for k, (d, label) in enumerate(zip(kept, labels, strict=True)) if label == k]
    near_removed = len(docs) - exact_removed - len(kept)
    stats = {
        "docs_in": len(docs),
        "docs_out": len(kept),
        "removed": {"exact_duplicate": exact_removed, "near_duplicate": near_removed},
    }
    return kept, stats
