"""Shared fixtures: a deterministic tiny text, a tokenizer trained on it, and a run folder with a tiny checkpoint."""

from __future__ import annotations

import contextlib
import socket
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from lmforge.tokenizer import Tokenizer

# English prose (pydoc topics) interleaved with code; all ship with every CPython, so the text needs no download.
_SOURCES = ["textwrap.py", "argparse.py", "json/decoder.py", "heapq.py", "bisect.py", "fractions.py"]


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """About 200 KB of English and Python text, the same for a given Python version."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prose = [topics[k] for k in sorted(topics)]
    code = [(stdlib / rel).read_text(encoding="utf-8") for rel in _SOURCES]
    text = "\n\n".join(prose)[:100_000] + "\n\n" + "\n\n".join(code)
    return text[:200_000]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_text: str) -> Tokenizer:
    return Tokenizer.train([tiny_text[i : i + 2000] for i in range(0, len(tiny_text), 2000)], vocab_size=512)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """A run folder with tokenizer files and a step-0 checkpoint of a 2-layer GQA llama-style model (vocab 512)."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.models import ModelConfig, build_model

    run_dir = tmp_path_factory.mktemp("tiny_run")
    tiny_tokenizer.save(run_dir)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)
    save_checkpoint(run_dir, 0, build_model(cfg, seed=0), state={})
    return run_dir


@contextlib.contextmanager
def serve_on_loopback(app):
    """A FastAPI app served by uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server():
    """`with live_server(app) as url:` serves a FastAPI app on loopback for the block's duration."""
    return serve_on_loopback
