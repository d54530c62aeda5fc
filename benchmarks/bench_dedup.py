"""Near-duplicate removal speed: lmforge's vectorised MinHash + LSH vs datasketch (MinHash.update_batch per document,
MinHashLSH query then insert) on the same synthetic corpus with planted near-duplicates, and how their removals compare.

    .venv/bin/python benchmarks/bench_dedup.py                 # 5,000 docs of 200 words, ~10 s
    .venv/bin/python benchmarks/bench_dedup.py --docs 20000

Both use word 5-shingles, 128 permutations, threshold 0.8 and the same LSH bands and rows (lmforge's, 16 x 8, passed
to MinHashLSH as `params`); ours verifies candidates by estimated Jaccard, datasketch does not. Exact-duplicate
removal is off so that both see the same documents. The run prints the precision and recall of our removed documents
against datasketch's removed set (agreement over all documents would count the kept majority), the recall of each on
the planted pairs, and the precision and recall two independent MinHash-LSH runs with these bands would reach.
Measured (Dec 2026, 5,000 docs): precision 0.995, recall 0.985; planted-pair recall 0.986 for ours, 0.998 for
datasketch. The gap is our verification: a copy with 3 edits (Jaccard ~0.86) has an estimated Jaccard below 0.8 in
~1-3% of cases at 128 permutations (standard error ~0.03), and we keep it; datasketch removes every LSH candidate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from lmforge.data.corpus import Document  # noqa: E402
from lmforge.data.dedup import DedupConfig, deduplicate  # noqa: E402


def synthetic_corpus(n_docs: int, words: int, dup_fraction: float, seed: int = 0) -> tuple[list[str], list[tuple]]:
    """Random-word documents; `dup_fraction` of them are copies of another with 1-3 words replaced (Jaccard ~0.86-0.95
    for 5-shingles of 200 words), shuffled in. Also returns (copy, source) index pairs."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    n_dup = int(n_docs * dup_fraction)
    base = rng.integers(0, vocab.size, (n_docs - n_dup, words))
    sources = rng.integers(0, len(base), n_dup)
    copies = base[sources].copy()
    for row in copies:
        row[rng.choice(words, rng.integers(1, 4), replace=False)] = rng.integers(0, vocab.size)
    order = rng.permutation(n_docs)
    where = np.argsort(order)  # where[old index] = new index
    pairs = [(int(where[len(base) + k]), int(where[src])) for k, src in enumerate(sources)]
    return [" ".join(vocab[row]) for row in np.concatenate([base, copies])[order]], pairs


def independent_overlap(texts: list[str], pairs: list[tuple], cfg: DedupConfig) -> float:
    """Expected precision (= recall) of one correct MinHash-LSH run against another with independent hash functions:
    each catches a planted copy of true Jaccard J with probability p = 1 - (1 - J^rows)^bands, both catch it with p^2,
    so sum(p^2) / sum(p). Datasketch's SHA-1 shingle hashes are independent of ours, so this is the most to expect."""
    bands, rows = cfg.banding()

    def shingles(text: str) -> set:
        w = text.split()
        return {tuple(w[i : i + cfg.shingle_size]) for i in range(len(w) - cfg.shingle_size + 1)}

    both = either = 0.0
    for copy, src in pairs:
        a, b = shingles(texts[copy]), shingles(texts[src])
        p = 1 - (1 - (len(a & b) / len(a | b)) ** rows) ** bands
        both, either = both + p * p, either + p
    return both / either


def datasketch_removed(texts: list[str], cfg: DedupConfig) -> set[int]:
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, params=cfg.banding())  # our bands and rows
    removed = set()
    for i, text in enumerate(texts):
        w = text.lower().split()
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([" ".join(w[j : j + cfg.shingle_size]).encode() for j in range(len(w) - cfg.shingle_size + 1)])
        if lsh.query(m):
            removed.add(i)
        lsh.insert(i, m)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--words", type=int, default=200)
    parser.add_argument("--dup-fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds of ours")
    args = parser.parse_args()
    texts, pairs = synthetic_corpus(args.docs, args.words, args.dup_fraction)
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    cfg = DedupConfig(exact=False)

    ours_s = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        kept, stats = deduplicate(docs, cfg)
        ours_s = min(ours_s, time.perf_counter() - t0)
    ours = set(range(len(docs))) - {int(d.id) for d in kept}

    t0 = time.perf_counter()
    theirs = datasketch_removed(texts, cfg)
    theirs_s = time.perf_counter() - t0

    n = len(docs)
    print(f"corpus: {n} docs x {args.words} words, {int(n * args.dup_fraction)} planted near-duplicates")
    print(f"lmforge     {n / ours_s:10,.0f} docs/s  ({ours_s:.2f} s, best of {args.rounds}), removed {len(ours)}")
    print(f"datasketch  {n / theirs_s:10,.0f} docs/s  ({theirs_s:.2f} s), removed {len(theirs)}")
    print(f"speedup     {theirs_s / ours_s:10.1f}x")
    both = len(ours & theirs)
    print(
        f"ours against datasketch's removed set: precision {both / max(len(ours), 1):.4f}, recall "
        f"{both / max(len(theirs), 1):.4f} ({both} removed by both, {len(ours - theirs)} only by us, "
        f"{len(theirs - ours)} only by datasketch)"
    )
    expected = independent_overlap(texts, pairs, cfg)
    print(f"expected precision = recall for two independent MinHash-LSH runs: {expected:.4f}")
    found = [sum(c in removed or s in removed for c, s in pairs) / len(pairs) for removed in (ours, theirs)]
    print(
        f"recall on the {len(pairs)} planted pairs (one of the two removed): lmforge {found[0]:.4f}, "
        f"datasketch {found[1]:.4f}"
    )


if __name__ == "__main__":
    main()
