"""Fixtures for the generation and serving tests: one intra-op thread, and a live server on loopback."""

from dataclasses import dataclass

import pytest
import torch
from fastapi import FastAPI

from lmforge.checkpoint import load_run
from lmforge.cpu import native
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.generate import prepare_for_decode
from lmforge.serve.server import build_app
from lmforge.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second intra-op thread only adds synchronisation, which stalls badly on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _forget_native_kernels():
    native._library.cache_clear()


@pytest.fixture
def numpy_only(monkeypatch):
    """Decode as on a machine without a C compiler: LMFORGE_NATIVE=0, so the kernels are None and numpy runs alone."""
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    _forget_native_kernels()
    assert not native.available()
    yield
    monkeypatch.delenv("LMFORGE_NATIVE")
    _forget_native_kernels()


@dataclass
class Served:
    model: torch.nn.Module
    tokenizer: Tokenizer
    engine: Engine
    app: FastAPI
    url: str


@pytest.fixture(scope="module")
def tiny_server(tiny_run, live_server) -> Served:
    """The tiny run served on loopback (model name "tiny"), with its engine at hand for checking its blocks."""
    model, tokenizer = load_run(tiny_run)
    prepare_for_decode(model)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, max_waiting=64))
    app = build_app(engine, "tiny")
    with live_server(app) as url:
        yield Served(model, tokenizer, engine, app, url)
