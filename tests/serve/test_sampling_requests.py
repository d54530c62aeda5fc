"""Sampling values at the edges through the HTTP API: extreme temperatures, penalties and seeds are served (never a
500), and a value out of range is a 400 naming it."""

from __future__ import annotations

import httpx
import pytest

from lmforge.checkpoint import load_run
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.server import build_app

NAME = "tiny"


@pytest.fixture(scope="module")
def url(tiny_run, live_server):
    model, tokenizer = load_run(tiny_run)
    with live_server(build_app(Engine(model, tokenizer, EngineConfig(block_size=8)), NAME)) as base:
        yield base


def complete(url: str, **body) -> httpx.Response:
    body = {"model": NAME, "prompt": "def", "max_tokens": 4, **body}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


@pytest.mark.parametrize(
    "body",
    [
        {"seed": 2**64},
        {"seed": 10**30},
        {"seed": -(2**63) - 1},
        {"seed": 2**64 - 1, "n": 16},
        {"temperature": 1e-320, "seed": 1},
        {"temperature": 1e-40, "n": 3},
        {"repetition_penalty": 1e-320, "temperature": 1.0},
    ],
)
def test_extreme_accepted_values_are_served(url, body):
    response = complete(url, **body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == body.get("n", 1)
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)


def test_seeded_choices_repeat(url):
    first = complete(url, seed=10**30, temperature=1.0, n=2).json()["choices"]
    again = complete(url, seed=10**30, temperature=1.0, n=2).json()["choices"]
    assert [c["text"] for c in first] == [c["text"] for c in again]


def test_a_refused_value_is_a_400_naming_it(url):
    response = complete(url, logprobs=None, top_k=-1)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "top_k"
