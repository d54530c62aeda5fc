import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from lmforge.config import from_dict
from lmforge.data import Document
from lmforge.data.dedup import (
    DedupConfig,
    SignatureShard,
    band_hashes,
    deduplicate,
    minhash_signatures,
    near_duplicate_clusters,
    optimal_banding,
    sharded_near_duplicate_clusters,
)
from lmforge.errors import LmforgeError


def shingles(text: str, k: int = 5) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + k]) for i in range(max(len(words) - k + 1, 1))}


def jaccard(x: str, y: str) -> float:
    a, b = shingles(x), shingles(y)
    return len(a & b) / len(a | b)


def planted_corpus(
    n_base: int, edits: tuple[int, ...], seed: int = 0
) -> tuple[list[str], dict[int, tuple[int, float]]]:
    """`n_base` random 200-word documents plus, for each, a copy with each number of `edits` words replaced, shuffled;
    returns the texts and, for each copy, (index of its source, true Jaccard similarity)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    base = [[rng.choice(vocab) for _ in range(200)] for _ in range(n_base)]
    items = [(" ".join(words), None) for words in base]
    for src, words in enumerate(base):
        for m in edits:
            copy = list(words)
            for pos in rng.sample(range(200), m):
                copy[pos] = rng.choice(vocab)
            items.append((" ".join(copy), src))
    order = list(range(len(items)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    texts = [items[old][0] for old in order]
    copies = {
        where[old]: (where[src], jaccard(items[old][0], items[src][0]))
        for old, (_, src) in enumerate(items)
        if src is not None
    }
    return texts, copies


def test_exact_duplicates_with_case_and_whitespace_variants():
    docs = [
        Document("a", "The quick brown fox"),
        Document("b", "something else entirely"),
        Document("c", "  the QUICK\n\tbrown   fox "),
        Document("d", "The quick brown fox"),
    ]
    kept, stats = deduplicate(docs, DedupConfig(near=False))
    assert [d.id for d in kept] == ["a", "b"]
    assert stats == {"docs_in": 4, "docs_out": 2, "removed": {"exact_duplicate": 2, "near_duplicate": 0}}
    assert deduplicate(docs, DedupConfig(exact=False, near=False))[0] == docs
    assert deduplicate([], DedupConfig())[1]["docs_out"] == 0


def test_planted_near_duplicates_recall_and_precision():
    texts, copies = planted_corpus(300, edits=(1, 2, 13, 30))
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    kept, stats = deduplicate(docs, DedupConfig())
    kept_ids = {int(d.id) for d in kept}
    removed = set(range(len(docs))) - kept_ids
    high = [(c, src) for c, (src, j) in copies.items() if j >= 0.9]
    assert len(high) >= 400
    # A high-similarity pair is caught if one of the two was removed.
    recall = np.mean([c in removed or src in removed for c, src in high])
    related = {c for c, (_, j) in copies.items() if j >= 0.7} | {src for _, (src, j) in copies.items() if j >= 0.7}
    precision = len(removed & related) / len(removed)
    assert recall >= 0.95 and precision >= 0.99, (recall, precision)
    assert stats["removed"]["near_duplicate"] == len(removed) and stats["docs_out"] == len(kept)
    assert max(j for _, j in copies.values() if j < 0.6) < 0.6  # the low-edit copies really are below threshold


def test_order_and_split_independent():
    texts, _ = planted_corpus(100, edits=(1, 2, 20))
    cfg = DedupConfig()
    sig = minhash_signatures(texts, cfg)
    # Signing in pieces (as workers would) gives the same signatures.
    assert np.array_equal(
        sig, np.concatenate([minhash_signatures(texts[:37], cfg), minhash_signatures(texts[37:], cfg)])
    )
    perm = np.random.default_rng(0).permutation(len(texts))
    labels = np.array(near_duplicate_clusters(sig, 9, 13, 0.8))
    labels_perm = np.array(near_duplicate_clusters(sig[perm], 9, 13, 0.8))
    same = labels[:, None] == labels[None, :]
    same_perm = np.empty_like(same)
    same_perm[np.ix_(perm, perm)] = labels_perm[:, None] == labels_perm[None, :]
    assert np.array_equal(same, same_perm)


def test_agrees_with_datasketch():
    texts, _ = planted_corpus(150, edits=(0, 1, 30))
    cfg = DedupConfig(exact=False)
    kept, _ = deduplicate([Document(str(i), t) for i, t in enumerate(texts)], cfg)
    ours = set(range(len(texts))) - {int(d.id) for d in kept}
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    theirs = set()
    for i, text in enumerate(texts):
        m = MinHash(num_perm=cfg.num_perm)
        m.update_batch([s.encode() for s in shingles(text)])
        if lsh.query(m):
            theirs.add(i)
        lsh.insert(i, m)
    assert len(ours) >= 280
    agreement = 1 - len(ours ^ theirs) / len(texts)
    assert agreement >= 0.98, agreement


def test_estimated_jaccard_close_to_true():
    texts, copies = planted_corpus(40, edits=(2, 8, 20, 45))
    sig = minhash_signatures(texts, DedupConfig())
    assert sig.shape == (len(texts), 128) and sig.dtype == np.uint32
    # Ideal MinHash: the share of equal rows is unbiased, with variance J(1-J)/num_perm (Broder 1997). So the errors
    # in standard deviations have mean ~0 and spread ~1; 160 pairs pin the mean to +-0.08, the spread to +-0.06.
    z = np.array([((sig[c] == sig[src]).mean() - j) / np.sqrt(j * (1 - j) / 128) for c, (src, j) in copies.items()])
    assert abs(z.mean()) < 0.25 and 0.8 < z.std() < 1.2 and np.abs(z).max() < 4.5, (z.mean(), z.std(), z.max())
    assert len({j for _, j in copies.values()}) > 10 and min(j for _, j in copies.values()) < 0.3


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_banding_matches_datasketch(threshold):
    bands, rows = optimal_banding(threshold, 128)
    assert (bands, rows) == _optimal_param(threshold, 128, 0.5, 0.5) and bands * rows <= 128
    assert DedupConfig(threshold=threshold, verify=False).banding() == (bands, rows)
    # verified candidates: misses weigh 19:1 against false candidates, so more bands of fewer rows
    recall_first = optimal_banding(threshold, 128, 0.05, 0.95)
    assert recall_first == _optimal_param(threshold, 128, 0.05, 0.95) and recall_first[0] > bands
    assert DedupConfig(threshold=threshold).banding() == recall_first
    assert DedupConfig(bands=16, rows=8).banding() == (16, 8)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"threshold": 1.0}, "dedup.threshold"),
        ({"threshold": 0.0}, "dedup.threshold"),
        ({"shingle_size": 0}, "dedup.shingle_size"),
        ({"bands": 20, "rows": 10}, "dedup.bands"),
        ({"bands": 4}, "dedup.bands"),
    ],
)
def test_bad_config_names_key(values, key):
    with pytest.raises(LmforgeError, match=key):
        from_dict(DedupConfig, values)


def test_words_are_cut_and_cased_as_python_does():
    # Words are found and hashed on bytes in numpy; they must be str.lower().split()'s words, Unicode spaces too.
    rng = random.Random(0)
    alphabet = [*"abcXYZé日", " ", "\t", "\n", "\x0b", "\x1c", "\u00a0", "\u3000", "\u2028", "\x85"]
    docs = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    docs += ["The quick brown fox jumps over", "the\u00a0QUICK brown\u3000fox\tjumps over  "]
    sig = minhash_signatures(docs, DedupConfig(shingle_size=2))
    respaced = minhash_signatures([" ".join(d.lower().split()) for d in docs], DedupConfig(shingle_size=2))
    assert np.array_equal(sig, respaced) and np.array_equal(sig[-1], sig[-2])
    words = {w for d in docs for w in d.lower().split()}
    single = minhash_signatures(sorted(words), DedupConfig(shingle_size=1))
    assert len({row.tobytes() for row in single}) == len(words)  # distinct words, distinct hashes


def huge_text(rng: random.Random, chars: int) -> str:
    """Words joined by assorted whitespace (runs, tabs, NBSP, U+3000), with capital sigmas and the odd long word."""
    vocab = ["ΟΔΟΣ", "Straße", "İstanbul", "x" * 900, "the", "River", "ünïcödé"] + [f"w{i}" for i in range(300)]
    seps = [" ", "  ", "\n", "\t \n", "\u00a0", "\u3000", "\x1c"]
    parts, n = [], 0
    while n < chars:
        word, sep = rng.choice(vocab), rng.choice(seps)
        parts += [word, sep]
        n += len(word) + len(sep)
    return "".join(parts)


@pytest.mark.parametrize("shingle_size", [1, 5])
def test_a_huge_document_is_signed_in_windows_to_the_same_signature(monkeypatch, shingle_size):
    from lmforge.data import dedup

    rng = random.Random(shingle_size)
    texts = [huge_text(rng, 60_000), "short one", huge_text(rng, 3_000), " ".join(["x" * 2000] * 3)]
    cfg = DedupConfig(shingle_size=shingle_size)
    whole = minhash_signatures(texts, cfg)
    keys = [dedup.exact_key(t) for t in texts]
    # the same texts as "huge": over 5,000 characters, signed and hashed in windows of ~300
    monkeypatch.setattr(dedup, "_BATCH_BYTES", 5_000)
    monkeypatch.setattr(dedup, "_WINDOW_CHARS", 300)
    assert len(list(dedup._windows(texts[0], shingle_size, 300))) > 100
    assert np.array_equal(minhash_signatures(texts, cfg), whole)
    assert [dedup.exact_key(t) for t in texts] == keys


def test_a_huge_document_is_signed_in_bounded_memory():
    import tracemalloc

    rng = random.Random(0)
    text = " ".join(f"w{rng.randrange(5000)}" for _ in range(300_000))  # 1.7 MB, over the 1 MB of a batch
    tracemalloc.start()
    minhash_signatures([text], DedupConfig())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 24 << 20, peak  # whole, its shingle block alone would take ~85 bytes a character (~150 MB)


def on_disk(sig: np.ndarray, cuts: list[int], folder, bands: int, rows: int, hashes=band_hashes) -> tuple:
    """The signatures cut into shards at `cuts`, each shard's band hashes saved in `folder`; returns the shards and a
    list that records how many signature rows each load returned."""
    loaded = []

    def load(part: np.ndarray):
        def signatures(at: np.ndarray) -> np.ndarray:
            loaded.append(len(at))
            return part[at]

        return signatures

    shards = []
    for k, part in enumerate(np.split(sig, cuts)):
        np.save(folder / f"bands_{k}.npy", hashes(part, bands, rows))
        shards.append(SignatureShard(folder / f"bands_{k}.npy", load(part)))
    return shards, loaded


@pytest.mark.parametrize(("bands", "rows", "threshold"), [(16, 8, 0.8), (16, 8, None), (9, 13, 0.8), (32, 2, 0.5)])
def test_sharded_clusters_on_disk_equal_the_in_memory_ones(tmp_path, bands, rows, threshold):
    """Uneven shards, an empty one among them, clustered from band hashes on disk: the very labels of the in-memory
    clustering (the first of each cluster kept, every other removed). A shard without candidates is not read."""
    texts, _ = planted_corpus(150, edits=(1, 2, 13, 30, 60))
    texts += texts[:5]  # identical signatures: ties in rank go by position
    texts += planted_corpus(100, edits=(), seed=1)[0]  # unrelated to all the others
    sig = minhash_signatures(texts, DedupConfig())
    expected = np.array(near_duplicate_clusters(sig, bands, rows, threshold))
    shards, loaded = on_disk(sig, [100, 100, 401, 905], tmp_path, bands, rows)
    labels = sharded_near_duplicate_clusters(shards, bands, rows, threshold)
    assert labels.tolist() == expected.tolist()
    assert (expected != np.arange(len(texts))).sum() >= 250  # the planted copies are removed
    assert len(loaded) == 3 and sum(loaded) < 905  # candidates only: not of the empty shard, nor the unrelated one


def test_colliding_band_hashes_change_nothing(tmp_path):
    """A hash shared by documents whose bands differ only makes them candidates: with every hash equal, every document
    is one, and the labels are still the in-memory ones."""
    texts, _ = planted_corpus(60, edits=(1, 13, 45))
    sig = minhash_signatures(texts, DedupConfig())
    shards, loaded = on_disk(sig, [50, 120], tmp_path, 16, 8, lambda s, b, r: np.zeros((b, len(s)), np.uint64))
    labels = sharded_near_duplicate_clusters(shards, 16, 8, 0.8)
    assert labels.tolist() == near_duplicate_clusters(sig, 16, 8, 0.8) and sum(loaded) == len(texts)
    assert sharded_near_duplicate_clusters([], 16, 8, 0.8).size == 0


def test_band_hashes_are_equal_exactly_where_bands_are():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 4, size=(400, 12), dtype=np.uint32)  # few values: many bands repeat
    hashes = band_hashes(sig, 4, 3)
    assert hashes.shape == (4, 400) and hashes.dtype == np.uint64
    for band in range(4):
        rows = sig[:, band * 3 : band * 3 + 3]
        same_rows = (rows[:, None] == rows[None]).all(-1)
        assert np.array_equal(hashes[band][:, None] == hashes[band][None], same_rows)


def test_sharded_clustering_memory_is_a_few_bytes_per_document(tmp_path):
    """50,000 documents, 500 of them planted duplicates: the clustering's peak is under 100 bytes per document, where
    the signatures alone take 512."""
    import tracemalloc

    rng = np.random.default_rng(0)
    sig = rng.integers(0, 1 << 32, size=(50_000, 128), dtype=np.uint32)
    sig[rng.choice(50_000, 500, replace=False)] = sig[rng.choice(50_000, 500, replace=False)]
    shards, loaded = on_disk(sig, list(range(5_000, 50_000, 5_000)), tmp_path, 16, 8)
    expected = near_duplicate_clusters(sig, 16, 8, 0.8)
    tracemalloc.start()
    labels = sharded_near_duplicate_clusters(shards, 16, 8, 0.8)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert labels.tolist() == expected and sum(loaded) <= 1_000
    assert peak < 100 * len(sig), peak / len(sig)
