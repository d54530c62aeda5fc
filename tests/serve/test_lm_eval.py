"""lm-evaluation-harness's `local-completions` model against a live server: a tiny multiple-choice task shipped in
tests/serve/lm_eval_task runs, and every loglikelihood it reports equals a forward pass of the same model here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import load_run
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.server import build_app

TASK_DIR = Path(__file__).parent / "lm_eval_task"
NAME = "tiny"


def reference(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """(log P(continuation | BOS + context), whether it is the greedy continuation), split as lm-eval splits it:
    the continuation's tokens are those of context + continuation after the context's own tokens."""
    whole = tokenizer.encode(context + continuation)
    n = len(tokenizer.encode(context))
    ids = [tokenizer.bos_id, *whole]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)
    rows = logprobs[n : len(whole)]  # row i predicts ids[i + 1] = whole[i]
    targets = torch.tensor(whole[n:])
    return float(rows.gather(1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_local_completions_loglikelihoods_equal_a_forward_pass(tiny_run, live_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_run(tiny_run)
    task = yaml.safe_load((TASK_DIR / "tiny_mc.yaml").read_text())
    # datasets resolves relative data_files against the working directory, so point at the file itself
    task["dataset_kwargs"] = {"data_files": {"test": str(TASK_DIR / "tiny_mc.jsonl")}, "cache_dir": str(tmp_path)}
    docs = [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    with live_server(build_app(Engine(model, tokenizer, EngineConfig(block_size=8)), NAME)) as url:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": NAME,
                "base_url": f"{url}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(tiny_run),  # the run folder's tokenizer files load in transformers' AutoTokenizer
                "batch_size": 4,  # several token-id prompts per request
                "max_length": model.cfg.max_seq_len,
            },
            tasks=[task],
            task_manager=TaskManager(include_defaults=False),  # indexing lm-eval's thousands of task YAMLs takes ~10 s
            log_samples=True,
            bootstrap_iters=0,
        )
    samples = sorted(results["samples"]["lmforge_tiny_mc"], key=lambda s: s["doc_id"])
    assert [s["doc"]["question"] for s in samples] == [d["question"] for d in docs]
    correct = []
    for sample, doc in zip(samples, docs, strict=True):
        print(sample["arguments"], sample["filtered_resps"])
        asked = [tuple(a) for a in sample["arguments"]]
        assert asked == [(doc["question"], choice) for choice in doc["choices"]]
        expected = [reference(model, tokenizer, context, continuation) for context, continuation in asked]
        got = [tuple(r) for r in sample["filtered_resps"]]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], abs=1e-3)
        assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
        scores = [lp for lp, _ in expected]
        correct.append(scores.index(max(scores)) == doc["answer"])
    assert results["results"]["lmforge_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
