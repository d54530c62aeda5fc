"""Memorisation and contamination on a tiny pre-training run: canaries planted in the training split only, their
exposure against never-planted controls (`lmforge eval RUN --task canary`), and the count of evaluation items that
share a 13-gram with the training data in every result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import load_run
from lmforge.cli import main
from lmforge.data.shards import shard_arrays
from lmforge.eval import safety
from lmforge.eval.contamination import training_texts
from lmforge.tokenizer import Tokenizer

TINY = [
    "model.vocab_size=384", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.hidden_dim=64", "model.max_seq_len=32", "train.batch_size=4", "train.steps=4", "train.eval_every=0",
    "train.eval_batches=1", "train.warmup_steps=2", "sample.prompts=[]", "data.val_fraction=0.1",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_text) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(tiny_text[i * 2500 : (i + 1) * 2500])
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A 4-step run with 3 canaries planted twice each."""
    root = tmp_path_factory.mktemp("runs")
    main(["pretrain", *TINY, f"data.path={corpus}", f"run.root={root}", "run.name=c", "data.canaries=3",
          "data.canary_repeats=2", "run.seed=7"])  # fmt: skip
    return root / "c"


def split_text(run: Path, split: str) -> str:
    tok = Tokenizer.load(run / "tokenizer.json")
    return "".join(tok.decode([int(t) for t in array]) for array in shard_arrays(run / f"data/{split}"))


def test_canaries_are_planted_in_the_training_split_only(trained):
    record = json.loads((trained / "canaries.json").read_text())
    drawn = safety.make_canaries(6, seed=7)
    assert record == {"seed": 7, "repeats": 2, "planted": drawn[:3], "controls": drawn[3:]}
    documents = list(training_texts(trained))
    train, val = split_text(trained, "train"), split_text(trained, "val")
    for canary in record["planted"]:
        assert documents.count(canary) == 2 and canary not in val
    for control in record["controls"]:
        assert control not in train and control not in val


def test_canary_task_reports_the_exposure_of_planted_canaries_and_controls(trained, tmp_path):
    spec = yaml.safe_load((Path(__file__).parents[2] / "configs/eval/canary.yaml").read_text())
    (tmp_path / "canary.yaml").write_text(yaml.safe_dump({**spec, "candidates": 200}))
    main(["eval", str(trained), "--task", str(tmp_path / "canary.yaml"), "--batch-size", "32"])
    result = json.loads((trained / "eval/canary.json").read_text())
    samples = [json.loads(line) for line in (trained / "eval/canary.samples.jsonl").read_text().splitlines()]
    assert result["n"] == 206 and [s["role"] for s in samples[:7]] == ["planted"] * 3 + ["control"] * 3 + ["candidate"]
    assert result["data"] == str(trained / "canaries.json") and result["contaminated"] == 0
    model, tok = load_run(trained)

    def loglik(texts: list[str]) -> list[float]:
        ids = [[tok.bos_id, *tok.encode(t)] for t in texts]
        with torch.no_grad():
            out = []
            for row in ids:
                logprobs = torch.log_softmax(model(torch.tensor([row]))[0].float(), -1)
                out.append(float(logprobs[:-1].gather(1, torch.tensor(row[1:])[:, None]).sum()))
        return out

    assert [s["ll"] for s in samples[:20]] == pytest.approx(loglik([s["text"] for s in samples[:20]]), abs=1e-4)
    candidates = [s["text"] for s in samples if s["role"] == "candidate"]
    assert candidates == safety.make_canaries(206, seed=7)[6:]
    for role in ("planted", "control"):
        texts = [s["text"] for s in samples if s["role"] == role]
        bits = [safety.exposure(loglik, t, candidates) for t in texts]
        assert result["metrics"][f"exposure_{role}"] == pytest.approx(sum(bits) / 3, abs=0.2)
        assert 0 <= result["metrics"][f"exposure_{role}"] <= 20


def test_items_copied_from_training_text_count_as_contaminated(trained, corpus, tmp_path):
    train, val = " ".join(training_texts(trained)), split_text(trained, "val")
    docs = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    seen = next(d for d in docs if d in train and d not in val)
    unseen = next(d for d in docs if d in val)
    items = [
        " ".join(seen.split()[100:130]),  # 30 words of a training document
        " ".join(unseen.split()[100:130]),  # of a validation document: held out, so not contaminated
        "a sentence that the corpus never held, written for this test alone, with more than thirteen words in it",
    ]
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
    task = {"family": "perplexity", "format": "jsonl", "prompt": "{{text}}", "metrics": ["ppl"]}
    (tmp_path / "copied.yaml").write_text(yaml.safe_dump(task))
    main(["eval", str(trained), "--task", str(tmp_path / "copied.yaml"), "--data", str(data)])
    assert json.loads((trained / "eval/copied.json").read_text())["contaminated"] == 1
    cache = trained / "eval/train_ngrams.npy"
    built = cache.stat().st_mtime_ns
    data.write_text(json.dumps({"text": items[0]}) + "\n")  # the cached index serves the next evaluation
    main(["eval", str(trained), "--task", str(tmp_path / "copied.yaml"), "--data", str(data)])
    assert json.loads((trained / "eval/copied.json").read_text())["contaminated"] == 1
    assert cache.stat().st_mtime_ns == built


@pytest.mark.parametrize(
    "override, message",
    [("data.canaries=-1", "data.canaries=-1 must be >= 0"), ("data.canary_repeats=0", "must be >= 1")],
)
def test_bad_canary_settings_exit_2_with_one_line(override, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", f"run.root={tmp_path}", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0]
    assert not any(tmp_path.iterdir())  # refused before anything is written
