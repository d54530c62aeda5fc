"""13-gram contamination: the same verdicts as lm-eval's decontamination Janitor and a naive n-gram set, and a
run's training documents decoded from its shards flag exactly the task items they contain."""

import io
import json
import random
from contextlib import redirect_stderr, redirect_stdout

import pytest

from lmforge.data.corpus import Document
from lmforge.data.shards import write_shards
from lmforge.errors import LmforgeError
from lmforge.eval.contamination import (
    build_index,
    contamination,
    ngrams,
    overlapping,
    run_contamination,
    task_items,
    training_texts,
)
from lmforge.tokenizer import Tokenizer

VOCAB = [f"w{i}" for i in range(400)] + ["Alpha", "beta,", "gamma.", "delta?", "(epsilon)", "Zeta's"]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def shout(words: list[str]) -> str:
    """The same words as the data might hold them: upper case, punctuation added."""
    return " ".join(w.upper() + ("," if i % 3 == 0 else "") for i, w in enumerate(words))


@pytest.fixture(scope="module")
def case():
    """Task items, and training documents of which some hold a 13-word span of an item (in another case and
    punctuation), some only a 12-word span, and some nothing."""
    rng = random.Random(0)
    items = [text(rng, 20) for _ in range(30)] + ["too short to hold a thirteen gram"]
    docs, planted = [], set()
    for k in range(60):
        body = text(rng, 120).split()
        if k % 3 < 2:
            i = rng.randrange(len(items) - 1)
            span = 13 if k % 3 == 0 else 12
            start = rng.randrange(20 - span + 1)
            body[50:50] = shout(items[i].split()[start : start + span]).split()
            if span == 13:
                planted.add(i)
        docs.append(" ".join(body))
    return items, docs, planted


def test_overlap_matches_lm_eval_janitor_and_a_naive_ngram_set(case):
    items, docs, planted = case
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # it warns that its C++ part is missing
        from lm_eval.decontamination.janitor import Janitor, word_ngrams

        janitor = Janitor(ngram_n=13)
        for item in items:
            janitor.register_contaminant_python(item)
    reference = [any(janitor.normalize_string(g) in janitor.dirt_ngrams for g in word_ngrams(d, 13)) for d in docs]
    naive_index = {g for item in items for g in ngrams(item, 13)}
    naive = [any(g in naive_index for g in ngrams(d, 13)) for d in docs]
    ours = overlapping(docs, build_index(items, 13), 13)
    assert ours == reference == naive
    assert sum(ours) == 20  # the 13-word spans; the 12-word ones are no match
    assert ngrams("The cat, the HAT!", 2) == [("the", "cat"), ("cat", "the"), ("the", "hat")]
    assert overlapping(["too short to hold a thirteen gram"], build_index(items, 13), 13) == [False]


def test_a_runs_training_documents_flag_the_items_they_contain(case, tmp_path):
    items, docs, planted = case
    tok = Tokenizer.train(docs, vocab_size=300)
    tok.save(tmp_path)
    write_shards([Document(str(i), d) for i, d in enumerate(docs)], tok, tmp_path / "data/train", shard_tokens=2000)
    assert list(training_texts(tmp_path)) == docs  # across shard boundaries too
    flags = contamination(docs, {"task": items})["task"]
    assert {i for i, f in enumerate(flags) if f} == planted
    report = run_contamination(tmp_path, {"task": items, "clean": ["nothing like the training text at all"] * 2})
    assert report["task"] == {"items": len(items), "overlapping": len(planted), "rate": len(planted) / len(items)}
    assert report["clean"]["overlapping"] == 0
    with pytest.raises(LmforgeError, match="pre-training run folder"):
        list(training_texts(tmp_path / "data"))


def test_task_items_read_every_string_field_of_jsonl_json_and_csv(tmp_path):
    rows = [{"question": "What is two plus two?", "choices": ["3", "4"], "answer": 1}, {"text": "Second item"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "t.csv").write_text("question,answer\nWhat is two plus two?,4\n")
    expected = ["What is two plus two?\n3\n4", "Second item"]
    assert task_items(tmp_path / "t.jsonl") == task_items(tmp_path / "t.json") == expected
    assert task_items(tmp_path / "t.csv") == ["What is two plus two?\n4"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LmforgeError, match="cannot be read"):
        task_items(tmp_path / "bad.json")
