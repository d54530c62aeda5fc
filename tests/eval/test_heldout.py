"""The speedrun's evaluation: held-out documents come back from the val shards as they were written, the next-line
items hold the true line at their label, and the stage writes the report's eval section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmforge.checkpoint import load_run
from lmforge.data.corpus import Document
from lmforge.data.shards import write_shards
from lmforge.eval import heldout
from lmforge.run import Run


def test_heldout_stage_scores_the_val_split(eval_run, tmp_path, tiny_text):
    run = Run(shutil.copytree(eval_run, tmp_path / "run"))
    _, tokenizer = load_run(run.path)
    docs = [tiny_text[i : i + 2500] for i in range(0, 10_000, 2500)]
    write_shards([Document(str(i), d) for i, d in enumerate(docs)], tokenizer, run.file("data/val"))
    assert heldout.heldout_texts(run.file("data/val"), tokenizer, max_bytes=10**6) == docs
    items = heldout.next_line_items(docs, n=50)
    assert len(items) == 50
    rows = ["\n".join(line for line in d.splitlines() if len(line.strip()) >= 16) for d in docs]  # lines of 16+ chars
    for item in items:
        true, other = item["choices"][item["label"]], item["choices"][1 - item["label"]]
        assert any(item["context"] + "\n" + true in r for r in rows) and other != true
    metrics = heldout.main(run, max_bytes=5000, items=20)
    assert 0 < metrics["perplexity_bits_per_byte"] < 16 and 0 <= metrics["next_line_acc"] <= 1
    summary = json.loads(run.file("eval.json").read_text())
    assert [t["task"] for t in summary["tasks"]] == ["perplexity", "next_line"]
    assert json.loads(run.file("eval/next_line.json").read_text())["n"] == 20
    assert isinstance(json.loads(run.file("eval_config.json").read_text())["run"], dict)
    assert Path(run.file("eval/perplexity.samples.jsonl")).is_file()
