"""`lmforge eval` end to end on a tiny run: results and samples files, resuming from the items already scored,
perplexity against a plain forward pass and lm-eval's rolling windows, generation tasks, the report section, and usage
errors (exit 2, one line)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_run
from lmforge.cli import main
from lmforge.eval.backends import Local

FIXTURES = Path(__file__).parents[1] / "fixtures" / "eval"


@pytest.fixture
def run(eval_run, tmp_path) -> Path:
    """A fresh copy of the tiny run for each test (results land in its folder)."""
    return Path(shutil.copytree(eval_run, tmp_path / "run"))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_eval_writes_results_and_resumes_from_scored_items(run, capsys):
    data = str(FIXTURES / "hellaswag_5.jsonl")
    main(["eval", str(run), "--task", "hellaswag", "--data", data, "--limit", "3", "--batch-size", "2"])
    samples = run / "eval/hellaswag.samples.jsonl"
    first = lines(samples)
    assert [json.loads(x)["i"] for x in first] == [0, 1, 2]
    with open(samples, "a") as f:
        f.write(first[0][:20])  # a line cut by an interrupted write
    main(["eval", str(run), "--task", "hellaswag", "--data", data, "--batch-size", "2"])
    after = lines(samples)
    assert after[:3] == first and sorted(json.loads(x)["i"] for x in after) == [0, 1, 2, 3, 4]
    result = json.loads((run / "eval/hellaswag.json").read_text())
    assert result["task"] == "hellaswag" and result["n"] == 5 and result["skipped"] == {}
    assert set(result["metrics"]) == {"acc", "acc_norm"} == set(result["stderr"])
    accs = [json.loads(x)["scores"]["acc"] for x in after]
    assert result["metrics"]["acc"] == pytest.approx(sum(accs) / 5)
    assert result["samples"] == "eval/hellaswag.samples.jsonl"
    summary = json.loads((run / "eval.json").read_text())
    assert summary["tasks"] == [{"task": "hellaswag", "n": 5, **result["metrics"]}]
    assert json.loads((run / "eval_config.json").read_text())["run"]["name"] == "run"
    main(["report", str(run)])
    assert "## eval" in (run / "report.md").read_text() and (run / "eval_scores.png").is_file()
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-2])["task"] == "hellaswag"  # the last line is the report's path


def test_a_changed_setting_scores_again(run):
    data = str(FIXTURES / "piqa_5.jsonl")
    main(["eval", str(run), "--task", "piqa", "--data", data, "--limit", "2"])
    main(["eval", str(run), "--task", "piqa", "--data", data, "--limit", "2", "--shots", "1"])
    assert len(lines(run / "eval/piqa.samples.jsonl")) == 2
    assert json.loads((run / "eval/piqa.json").read_text())["shots"] == 1


def test_perplexity_equals_a_forward_pass_and_lm_eval_windows(eval_run, tiny_text):
    from lm_eval.api.instance import Instance

    from lmforge.eval.lm_eval_model import LmforgeLM

    model, tokenizer = load_run(eval_run)
    backend = Local(model, tokenizer)
    short = tiny_text[:300]
    ids = [tokenizer.bos_id, *tokenizer.encode(short)]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    expected = -float(logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert backend.rolling_nll(short) == (pytest.approx(expected, abs=1e-3), len(ids) - 1)
    # windows that advance by the whole context are lm-eval's disjoint rolling windows
    long = tiny_text[:4000]
    nll, tokens = backend.rolling_nll(long, stride=model.cfg.max_seq_len)
    ours = LmforgeLM(model=model, tokenizer=tokenizer, add_bos_token=False)
    theirs = ours.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), idx=0)])[0]
    assert tokens == len(tokenizer.encode(long)) and -nll == pytest.approx(theirs, abs=1e-3)
    # more context per token can only be scored differently, never drop or repeat a token
    assert backend.rolling_nll(long, stride=64)[1] == tokens


def test_generation_tasks_write_their_completions(run):
    main(
        ["eval", str(run), "--task", "gsm8k", "--data", str(FIXTURES / "gsm8k_4.jsonl"), "--limit", "2", "--shots", "1"]
    )
    result = json.loads((run / "eval/gsm8k.json").read_text())
    assert result["n"] == 2 and set(result["metrics"]) == {"exact_match_strict", "exact_match_flexible"}
    sample = json.loads(lines(run / "eval/gsm8k.samples.jsonl")[0])
    assert sample["prompt"].count("Question:") == 2 and sample["reference"].endswith("#### 72")
    assert "Question:" not in sample["completion"]  # a stop string ends the completion
    main(["eval", str(run), "--task", "squad", "--data", str(FIXTURES / "squad_3.jsonl")])
    result = json.loads((run / "eval/squad.json").read_text())
    assert result["n"] == 3 and 0 <= result["metrics"]["f1"] <= 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "piqa", "hellaswag", "--data", "x.jsonl"], "--data names the file of one task"),
        (["--task", "hellaswg"], "no task 'hellaswg'"),
        (["--task", "piqa", "--data", "missing.jsonl"], "data file missing.jsonl for task piqa does not exist"),
        (["--task", "piqa", "--limit", "0"], "argument --limit: 0 must be >= 1"),
        (["--task", "next_line"], "task next_line has no default data file; pass one with --data"),
    ],
)
def test_usage_errors_exit_2_with_one_line(run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(run), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_context_longer_than_the_model_is_cut_on_the_left_and_counted(eval_run):
    model, tokenizer = load_run(eval_run)
    backend = Local(model, tokenizer)
    context = " ".join(["word"] * 2000)
    [scores, reason] = backend.loglikelihood([(context, [" a", " b"]), ("x", [" y" * 2000])])
    assert len(scores) == 2 and all(math.isfinite(lp) for lp, _ in scores)
    assert reason == "continuation longer than the model's context" and backend.truncated == 1
