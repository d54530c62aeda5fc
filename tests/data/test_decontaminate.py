"""`data prepare decontaminate=[...]`: documents sharing a 13-gram with a task item are removed and counted per task
file, the same documents a naive n-gram set comparison finds; the others stay."""

import json
import random
import string
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.data.prepare import DataPrepConfig, main
from lmforge.errors import LmforgeError

_WORDS = (
    "river garden window market teacher morning silver planet engine harbor letter forest village winter summer "
    "candle bridge doctor kitchen mountain painter station journey pocket ribbon valley thunder orange meadow castle "
    "lantern button feather compass blanket pepper saddle island tunnel marble quietly slowly bright gentle narrow"
)
WORDS = _WORDS.split(" ")
WEB = Path(__file__).resolve().parents[2] / "configs/data/web.yaml"


def prose(seed: int, sentences: int = 10) -> str:
    rng = random.Random(seed)
    return " ".join(
        f"The {a} {b} and {' '.join(rest)} with the {rng.choice(WORDS)}."
        for a, b, *rest in (rng.sample(WORDS, 7) for _ in range(sentences))
    )


def naive_ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    w = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("decontaminate")
    qa = [{"question": prose(100 + i, 2), "answer": "forty two"} for i in range(5)]
    (root / "task_a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (root / "task_b.csv").write_text("question,answer\n" + "".join(f'"{prose(200 + i, 2)}",yes\n' for i in range(5)))

    def span(text: str, n: int) -> str:  # n words from the middle, shouted and re-punctuated
        return " ".join(w.upper().strip(".") + ";" for w in text.split()[3 : 3 + n])

    docs = {f"clean_{i}.txt": prose(i) for i in range(5)}
    docs["a13.txt"] = prose(10) + " " + span(qa[1]["question"], 13) + " " + prose(11)
    docs["a12.txt"] = prose(12) + " " + span(qa[2]["question"], 12) + " " + prose(13)
    docs["b13.txt"] = prose(14) + " " + span(prose(203, 2), 14) + " " + prose(15)
    docs["ab.txt"] = span(prose(204, 2), 13) + " " + prose(16) + " " + span(qa[4]["question"], 13)
    corpus = root / "corpus"
    corpus.mkdir()
    for name, text in docs.items():
        (corpus / name).write_text(text)
    tasks = [str(root / "task_a.jsonl"), str(root / "task_b.csv")]
    overrides = [f"input={corpus}", f"output={root / 'out'}", "vocab_size=300", "workers=1", "dedup.near=false"]
    cfg = load_config(DataPrepConfig, WEB, [*overrides, f"decontaminate=[{tasks[0]}, {tasks[1]}]"])
    return root, docs, tasks, main(cfg)


def test_overlapping_documents_are_removed_and_counted_per_task_file(prepared):
    root, docs, (task_a, task_b), stats = prepared
    stages = {s["name"]: s for s in stats["stages"]}
    assert list(stages) == ["read", "normalize", "quality", "decontaminate", "dedup", "scrub", "toxicity"]
    assert stages["quality"]["docs_out"] == len(docs)  # every document reaches decontamination
    assert stages["decontaminate"]["removed"] == {f"overlaps:{task_a}": 2, f"overlaps:{task_b}": 1}
    assert stats["docs_out"] == len(docs) - 3
    rejects = [json.loads(line) for line in (root / "out/rejects.jsonl").read_text().splitlines()]
    removed = {r["id"] for r in rejects if r["stage"] == "decontaminate"}
    assert removed == {"a13.txt", "b13.txt", "ab.txt"}  # a12.txt shares only 12 words in a row: it stays
    # the same verdicts from a naive comparison of n-gram sets, item by item
    items = [json.dumps(r) for r in map(json.loads, Path(task_a).read_text().splitlines())]
    items += Path(task_b).read_text().splitlines()[1:]
    grams = set().union(*(naive_ngrams(i) for i in items))
    assert {name for name, text in docs.items() if naive_ngrams(text) & grams} == removed


def test_decontaminate_names_a_missing_task_file(tmp_path):
    with pytest.raises(LmforgeError, match="decontaminate entry"):
        load_config(DataPrepConfig, WEB, [f"decontaminate=[{tmp_path / 'none.jsonl'}]"])
