"""Generated tasks are deterministic, their train and held-out splits disjoint and their answers right; GSM8K and
task files are read with unanswerable records counted."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmforge.align.verifiable_tasks import generate_tasks, read_tasks, split_tasks

FIXTURE = Path(__file__).parents[1] / "fixtures" / "gsm8k_train_12.jsonl"


def test_generation_is_deterministic_and_the_splits_disjoint():
    kw = dict(digits=2, terms=2, ops="+-*")
    a = generate_tasks("arithmetic", 300, "train", seed=1, **kw)
    assert a == generate_tasks("arithmetic", 300, "train", seed=1, **kw)
    assert a != generate_tasks("arithmetic", 300, "train", seed=2, **kw)
    for kind in ("arithmetic", "word_problems"):
        train = {t.prompt[-1]["content"] for t in generate_tasks(kind, 400, "train", seed=0, **kw)}
        held = {t.prompt[-1]["content"] for t in generate_tasks(kind, 40, "held_out", seed=0, **kw)}
        assert len(train) == 400 and len(held) == 40 and not train & held


def test_answers_are_right():
    for t in generate_tasks("arithmetic", 50, "train", seed=0, digits=3, terms=3, ops="+-*", instruction=""):
        expr = re.fullmatch(r"What is (.*)\?", t.prompt[-1]["content"]).group(1)
        assert int(t.answer) == eval(expr)  # noqa: S307 - digits and operators only
    for t in generate_tasks("word_problems", 50, "train", seed=0, ops="+-*", system="Be brief."):
        assert t.prompt[0] == {"role": "system", "content": "Be brief."}
        a, b = map(int, re.findall(r"\d+", t.prompt[-1]["content"])[:2])
        text = t.prompt[-1]["content"]
        want = a + b if "more" in text else a - b if "gives away" in text else a * b
        assert int(t.answer) == want and "####" in text  # the answer format instruction follows the question


def test_gsm8k_and_task_files(tmp_path):
    tasks, rejected = read_tasks(str(FIXTURE), "gsm8k", instruction="Say '#### N'.")
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert [t.answer for t in tasks] == [r["answer"].split("####")[-1].strip() for r in records] and not rejected
    assert tasks[0].prompt == [{"role": "user", "content": records[0]["question"] + " Say '#### N'."}]
    path = tmp_path / "tasks.jsonl"
    rows = [{"prompt": "1+1?", "answer": 2}, {"prompt": [{"role": "user", "content": "f?"}], "tests": "assert f()"},
            {"prompt": "no answer"}, {"answer": "3"}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks, rejected = read_tasks(str(path), "tasks")
    assert [t.answer for t in tasks] == ["2", ""] and tasks[1].tests == "assert f()"
    assert rejected == {"no prompt or neither answer nor tests": 2}
    train, held = split_tasks(generate_tasks("arithmetic", 200, "train", seed=0), 0.2)
    assert 10 < len(held) < 70 and len(train) + len(held) == 200
