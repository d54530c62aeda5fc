"""Fixtures for the training tests: a small folder of text files."""

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_text) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(tiny_text[i * 2500 : (i + 1) * 2500])
    return folder
