"""Fixtures of the compression tests: a method run on the tiny run through the CLI's config and METHODS entry."""

from __future__ import annotations

import pytest

from lmforge.checkpoint import load_run
from lmforge.compress.calibration import calibration_windows
from lmforge.compress.config import CompressConfig
from lmforge.compress.main import METHODS
from lmforge.compress.store import save_compressed
from lmforge.config import load_config
from lmforge.run import Run


def _compress_tiny(tmp_path, tiny_run, tiny_text, *overrides):
    """Compress the tiny run with the CLI's config and METHODS entry; (the in-memory result, the saved run folder)."""
    text = tmp_path / "text.txt"
    text.write_text(tiny_text[:40_000])
    cfg = load_config(
        CompressConfig,
        None,
        [f"base={tiny_run}", f"run.root={tmp_path}", f"calibration.path={text}", "train.batch_size=2", *overrides],
    )
    model, tokenizer = load_run(tiny_run)
    windows = calibration_windows(tokenizer, text, 16, 32)
    run = Run.from_config(cfg.run)
    result = METHODS[cfg.method](cfg, model, tokenizer, windows, run)
    save_compressed(run.path, result.model, tokenizer, {"method": cfg.method}, result.steps)
    tokenizer.save(run.path)
    return result, run.path


@pytest.fixture
def compress_tiny():
    """compress_tiny(tmp_path, tiny_run, tiny_text, *overrides) -> (the in-memory result, the saved run folder)."""
    return _compress_tiny
