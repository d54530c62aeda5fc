"""Against lm-evaluation-harness 0.4's `hf` model on our transformers export: the multiple-choice family gives the same
log-likelihood for every choice of every item (HellaSwag and PIQA slices), and lm-eval run on our in-process model
(LmforgeLM) gives the same results as lm-eval run on the export."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.checkpoint import load_run
from lmforge.eval.backends import Local
from lmforge.eval.families import multiple_choice
from lmforge.eval.lm_eval_model import LmforgeLM
from lmforge.eval.tasks import load_task, read_items

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval"


@pytest.fixture(scope="module")
def hflm(eval_export):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(eval_export), batch_size=4, device="cpu", dtype="float32")


def lm_eval_loglikelihoods(lm, pairs: list[tuple[str, str]]) -> list[float]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, idx=i) for i, pair in enumerate(pairs)]
    return [lp for lp, _ in lm.loglikelihood(requests, disable_tqdm=True)]


@pytest.mark.parametrize("name, file", [("hellaswag", "hellaswag_5.jsonl"), ("piqa", "piqa_5.jsonl")])
def test_choices_score_as_lm_eval_hf_scores_them(eval_run, hflm, name, file):
    task = load_task(name)
    items = read_items(task, FIXTURES / file)
    model, tokenizer = load_run(eval_run)
    samples = multiple_choice(task, Local(model, tokenizer, batch_size=3), list(enumerate(items)), items, 0)
    assert [s.get("skipped") for s in samples] == [None] * len(items)
    for item, sample in zip(items, samples, strict=True):
        context = task.render(task.prompt, item)
        choices = task.value(task.choices, item)
        expected = lm_eval_loglikelihoods(hflm, [(context, " " + c) for c in choices])
        assert sample["lls"] == pytest.approx(expected, abs=1e-4)
        assert sample["gold"] == int(task.value(task.answer, item))
        assert sample["pred"] == max(range(len(expected)), key=expected.__getitem__)


def test_simple_evaluate_in_process_equals_the_hf_route(eval_run, hflm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    task = {
        "task": "lmforge_piqa_slice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(FIXTURES / "piqa_5.jsonl")}, "cache_dir": str(tmp_path)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    model, tokenizer = load_run(eval_run)
    results = {}
    for lm in (LmforgeLM(model=model, tokenizer=tokenizer, batch_size=4), hflm):
        results[type(lm).__name__] = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            task_manager=TaskManager(include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )
    ours, theirs = (results[k] for k in ("LmforgeLM", "HFLM"))
    assert ours["results"] == theirs["results"]  # the same picks, so the same acc and acc_norm
    for a, b in zip(ours["samples"]["lmforge_piqa_slice"], theirs["samples"]["lmforge_piqa_slice"], strict=True):
        assert [lp for lp, _ in a["filtered_resps"]] == pytest.approx([lp for lp, _ in b["filtered_resps"]], abs=1e-4)


def test_generate_until_equals_lm_eval_hf_and_the_model_registers(eval_run, hflm):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from lmforge.eval.lm_eval_model import register

    model, tokenizer = load_run(eval_run)
    ours = LmforgeLM(model=model, tokenizer=tokenizer)
    args = ("Question: How do I open a jar?\nAnswer:", {"until": ["\n\n", "Question:"], "max_gen_toks": 12})
    requests = [Instance("generate_until", {}, args, idx=0)]
    assert ours.generate_until(requests) == hflm.generate_until(requests, disable_tqdm=True)
    register()
    assert get_model("lmforge") is LmforgeLM
