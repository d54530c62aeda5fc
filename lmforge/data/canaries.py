"""Canaries for measuring memorisation: random "secret numbers" planted a few times in the training split only
(Carlini et al. 2019, "The Secret Sharer"); `lmforge eval RUN --task canary` measures their exposure."""

from __future__ import annotations

import random

from lmforge.data.corpus import Document

CANARY_PREFIX = "my secret number is"
CANARY_DIGITS = 6


def make_canaries(n: int, seed: int) -> list[str]:
    """n random canaries, "my secret number is 7 3 9 1 2 8": the paper's format, digits spaced so a tokenizer
    sees each one. The first n of make_canaries(m, seed) are make_canaries(n, seed) for any m >= n."""
    rng = random.Random(seed)
    return [f"{CANARY_PREFIX} {' '.join(rng.choice('0123456789') for _ in range(CANARY_DIGITS))}" for _ in range(n)]


def plant_canaries(train: list[Document], n: int, repeats: int, seed: int) -> tuple[list[Document], dict]:
    """The training documents with n canaries inserted `repeats` times each, as documents of their own at positions
    drawn from `seed`, and the record of canaries.json: the planted canaries and as many controls from the same
    generator that were never planted (the generator's next n)."""
    drawn = make_canaries(2 * n, seed)
    planted, controls = drawn[:n], drawn[n:]
    docs = list(train)
    rng = random.Random(seed)
    for k, canary in enumerate(planted):
        for r in range(repeats):
            docs.insert(rng.randrange(len(docs) + 1), Document(f"canary/{k}/{r}", canary))
    return docs, {"seed": seed, "repeats": repeats, "planted": planted, "controls": controls}
