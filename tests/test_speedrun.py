"""The speedrun at tiny scale: the corpus passes the data stages into the run folder, then training uses their shards
and the run's data.json shows what each stage kept and removed."""

import json

import pytest

from lmforge.cli import run_stage
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.speedrun import SpeedrunConfig


def test_speedrun_filters_its_corpus_then_trains_on_it(tmp_path, tiny_text):
    corpus = tmp_path / "corpus.jsonl"
    docs = [tiny_text[i : i + 3000] for i in range(0, 90_000, 3000)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*docs, *docs[:4], "too short"]))
    overrides = ["depth=1", "steps=2", f"data.input={corpus}", "data.vocab_size=300", "data.workers=1"]
    metrics = run_stage("speedrun", None, [*overrides, f"run.root={tmp_path}", "run.name=s"])
    run = tmp_path / "s"
    stats = json.loads((run / "data/stats.json").read_text())
    data = json.loads((run / "data.json").read_text())
    assert data["lineage"]["prepared"] == str((run / "data").resolve())
    assert [(r["stage"], r["docs_in"], r["docs_kept"], r["docs_removed"]) for r in data["stages"]] == [
        (s["name"], s["docs_in"], s["docs_out"], s["docs_in"] - s["docs_out"]) for s in stats["stages"]
    ]
    rows = {r["stage"]: r for r in data["stages"]}
    assert "exact_duplicate" in rows["dedup"]["removed"] and "too_few_words 1" in rows["quality"]["removed"]
    config = json.loads((run / "pretrain_config.json").read_text())
    assert config["data"]["path"] == str(run / "data") and config["model"]["vocab_size"] == 300
    manifest = json.loads((run / "data/train/manifest.json").read_text())
    assert json.loads((run / "pretrain.json").read_text())["corpus"]["train_tokens"] == manifest["total_tokens"]
    assert metrics["steps"] == 2 and metrics["data_stages_seconds"] > 0
    assert (run / "report.md").is_file()
    # then fine-tuning on pairs mined from the embedded corpus, into its own run, summarised in this run's report
    assert metrics["finetune_seconds"] > 0 and (tmp_path / "s-sft/checkpoints").is_dir()
    assert json.loads((run / "finetune.json").read_text())["training"]["steps"] == 2
    assert "## finetune" in (run / "report.md").read_text()
    # then DPO of the fine-tuned run on the same functions, each description's own chosen over another's
    assert metrics["align_seconds"] > 0 and (tmp_path / "s-dpo/checkpoints").is_dir()
    assert json.loads((tmp_path / "s-dpo/align_config.json").read_text())["policy"] == str(tmp_path / "s-sft")
    assert json.loads((run / "align.json").read_text())["training"]["steps"] == 2
    assert "## align" in (run / "report.md").read_text()
    # last, the pre-trained model quantized three ways, each measured on the held-out text
    rows = json.loads((run / "compress.json").read_text())
    assert set(rows) == {"base", "int8", "int4", "gptq"} and abs(rows["int8"]["perplexity_change_pct"]) < 1
    assert rows["int4"]["size_mib"] < rows["int8"]["size_mib"] < rows["base"]["size_mib"]
    assert (tmp_path / "s-gptq/checkpoints").is_dir() and "## compress" in (run / "report.md").read_text()


def test_speedrun_data_settings_are_validated():
    with pytest.raises(LmforgeError, match="vocab_size=100 must be >= 263"):
        load_config(SpeedrunConfig, None, ["data.vocab_size=100"])
    assert load_config(SpeedrunConfig, None, []).data.output == ""
