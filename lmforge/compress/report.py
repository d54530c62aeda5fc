"""`lmforge compress report BASE OUT...`: a table of each compressed run against its base."""

from __future__ import annotations

from lmforge.errors import LmforgeError


def command(argv: list[str]) -> None:
    raise LmforgeError("lmforge compress report is not built yet")
