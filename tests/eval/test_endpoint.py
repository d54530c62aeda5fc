"""Evaluating through `lmforge serve`'s OpenAI API: the same choices, log-likelihoods and greedy completions as the
model in-process; a refused or timed-out request is counted as a skip reason; an unreachable server is one error."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.eval.backends import Local
from lmforge.eval.endpoint import Endpoint
from lmforge.eval.families import generation, multiple_choice
from lmforge.eval.tasks import load_task, read_items
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.server import build_app

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval"


@pytest.fixture(scope="module")
def served(eval_run, live_server):
    model, tokenizer = load_run(eval_run)
    app = build_app(Engine(model, tokenizer, EngineConfig(block_size=8)), "tiny", api_key="k")
    with live_server(app) as url:
        yield url, Local(model, tokenizer)


def test_choices_score_as_in_process(served):
    url, local = served
    task = load_task("hellaswag")
    items = list(enumerate(read_items(task, FIXTURES / "hellaswag_5.jsonl")))
    remote = multiple_choice(task, Endpoint(url + "/v1", api_key="k"), items, [], 0)
    here = multiple_choice(task, local, items, [], 0)
    for a, b in zip(remote, here, strict=True):
        assert a["lls"] == pytest.approx(b["lls"], abs=1e-3) and a["pred"] == b["pred"]


def test_completions_equal_in_process_and_failures_are_counted(served):
    url, local = served
    task = replace(load_task("gsm8k"), max_tokens=12, until=["\n"])
    items = read_items(task, FIXTURES / "gsm8k_4.jsonl")
    endpoint = Endpoint(url, api_key="k")
    remote = generation(task, endpoint, list(enumerate(items[:2])), items, 1)
    here = generation(task, local, list(enumerate(items[:2])), items, 1)
    assert [s["completion"] for s in remote] == [s["completion"] for s in here]
    too_long = {"question": "x " * 50_000, "answer": "#### 1"}  # more characters than the context can hold: HTTP 400
    assert generation(task, endpoint, [(0, too_long)], items, 0) == [{"i": 0, "skipped": "endpoint refused (HTTP 400)"}]
    endpoint.client.timeout = httpx.Timeout(1e-6)
    assert generation(task, endpoint, [(0, items[0])], items, 0) == [{"i": 0, "skipped": "endpoint timed out"}]
    assert json.dumps(remote)


def test_lmforge_eval_scores_a_server(served, tmp_path):
    from lmforge.cli import main

    url, _ = served
    data = str(FIXTURES / "piqa_5.jsonl")
    main(["eval", url, "--task", "piqa", "--data", data, "--api-key", "k", "--out", str(tmp_path / "served")])
    result = json.loads((tmp_path / "served/eval/piqa.json").read_text())
    assert result["n"] == 5 and result["skipped"] == {}
    config = json.loads((tmp_path / "served/eval_config.json").read_text())
    assert config["evaluated"] == url and "api_key" not in config


def test_an_unreachable_or_refusing_server_is_one_clear_error(served):
    url, _ = served
    with pytest.raises(LmforgeError, match="cannot list the models of .*401"):
        Endpoint(url)  # no API key
    with pytest.raises(LmforgeError, match="start the server"):
        Endpoint("http://127.0.0.1:9", timeout=2)
