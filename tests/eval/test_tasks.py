"""Task files: every shipped YAML loads and renders its fixture items as lm-eval's tasks render them; a broken task
file is one clear error; a broken item is counted as a skip reason, never a crash."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.eval.families import multiple_choice
from lmforge.eval.tasks import Task, few_shot_prefix, load_task, read_items, task_names

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval"
SHIPPED = [
    "advbench", "arc", "bias", "canary", "cnndm", "gsm8k", "hellaswag", "humaneval", "mmlu", "next_line", "overrefusal",
    "perplexity", "piqa", "squad", "wmt",
]  # fmt: skip


def test_every_shipped_task_loads():
    assert task_names() == SHIPPED
    for name in SHIPPED:
        task = load_task(name)
        assert task.name == name and task.metrics


@pytest.mark.parametrize(
    "name, file, lm_eval_yaml",
    [("arc", "arc_easy_4.jsonl", "arc/arc_easy.yaml"), ("piqa", "piqa_5.jsonl", "piqa/piqa.yaml")],
)
def test_items_render_as_lm_eval_renders_them(name, file, lm_eval_yaml):
    import lm_eval
    from lm_eval.utils import apply_template

    spec = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / lm_eval_yaml).read_text())
    task = load_task(name)
    for item in read_items(task, FIXTURES / file):
        assert task.render(task.prompt, item) == apply_template(spec["doc_to_text"], item)
        assert task.value(task.choices, item) == ast.literal_eval(apply_template(spec["doc_to_choice"], item))
        target = spec["doc_to_target"]
        assert task.value(task.answer, item) == int(item[target] if target in item else apply_template(target, item))


def test_few_shot_examples_never_include_the_item():
    task = load_task("gsm8k")
    items = read_items(task, FIXTURES / "gsm8k_4.jsonl")
    prefix = few_shot_prefix(task, items, 0, 2)
    assert items[0]["question"] not in prefix and prefix.count("Question:") == 2
    assert prefix.startswith(f"Question: {items[1]['question']}\nAnswer: {items[1]['answer']}\n\n")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty or not a mapping"),
        ("family: multiple_choice\nprompt: x\n", "has no `metrics`"),
        ("family: multiple_choice\nmetrics: [acc]\nprompt: x\n", "needs `choices`"),
        ("family: quiz\nmetrics: [acc]\n", "mine.yaml: family='quiz' is not a valid choice"),
        ("family: generate\nmetrics: [f1]\nprompt: '{{x'\n", "`prompt` is not a valid template"),
        ("family: generate\nmetrics: [f1]\nprompt: x\nshots: 3\n", "did you mean"),
        (
            "family: generate\nmetrics: [acc]\nprompt: x\n",
            "family generate has no metric 'acc'; choose from bertscore_f1",
        ),
    ],
)
def test_a_broken_task_file_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(LmforgeError, match=message):
        load_task(str(path))


def test_missing_task_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(LmforgeError, match="no task 'hellaswg'; pick one of advbench"):
        load_task("hellaswg")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LmforgeError, match="holds no items"):
        read_items(load_task("piqa"), tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"goal": 1}\n{oops\n')
    with pytest.raises(LmforgeError, match="bad.jsonl:2 is not JSON"):
        read_items(load_task("piqa"), tmp_path / "bad.jsonl")


def test_parallel_files_pair_their_lines(tmp_path):
    from dataclasses import replace

    (tmp_path / "src.de").write_text("Hallo Welt\nGuten Morgen\n")
    (tmp_path / "ref.en").write_text("Hello world\nGood morning\n")
    task = replace(load_task("wmt"), references=str(tmp_path / "ref.en"))
    items = read_items(task, tmp_path / "src.de")
    assert items == [
        {"source": "Hallo Welt", "reference": "Hello world"},
        {"source": "Guten Morgen", "reference": "Good morning"},
    ]
    assert task.render(task.prompt, items[0]).endswith("German: Hallo Welt\nEnglish:")
    (tmp_path / "ref.en").write_text("Hello world\n")
    with pytest.raises(LmforgeError, match="has 2 lines and .* 1; give aligned files"):
        read_items(task, tmp_path / "src.de")


class Unused:
    """A backend that must not be asked anything: every item here is skipped before scoring."""

    def loglikelihood(self, requests):
        assert not requests
        return []


def test_broken_items_are_counted_by_reason():
    task = Task(name="t", family="multiple_choice", metrics=["acc"], prompt="{{q}}", choices="c", answer="a")
    items = [{"q": "x", "c": ["a", "b"], "a": 2}, {"c": ["a"], "a": 0}, {"q": "x", "c": ["a"], "a": "zero"}]
    samples = multiple_choice(task, Unused(), list(enumerate(items)), items, 0)
    assert [s["skipped"] for s in samples] == [
        "answer out of range",
        "missing field ('q' is undefined)",
        "bad item (ValueError)",
    ]
    assert json.dumps(samples)  # records are plain JSON
