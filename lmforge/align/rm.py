"""Placeholder while the method is being built (replaced in this session)."""

from __future__ import annotations

from lmforge.errors import LmforgeError


def train(cfg, run) -> dict[str, float]:
    raise LmforgeError("method=rm is not built yet")
