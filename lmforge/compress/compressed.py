"""What a compression method returns: the compressed model, its figures, and the training steps it took."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmforge.models import Decoder


@dataclass
class Compressed:
    model: Decoder
    """The compressed model (its compressed modules installed; a plain Decoder for pruning and distillation)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Method-specific figures for compress.json and the report."""
    steps: int = 0
    """Training steps taken (the checkpoint's step)."""
