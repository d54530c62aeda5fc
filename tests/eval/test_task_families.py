"""`lmforge eval` end to end on a tiny run for the code, translation, summarisation, safety and bias tasks: each
result holds the metrics its YAML names, recomputed here by the reference library on the completions read back from
the samples file; `lmforge eval --help` names every task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.checkpoint import load_run
from lmforge.cli import main
from lmforge.eval import nlg, safety
from lmforge.eval.tasks import TASK_DIR, task_names

FIXTURES = Path(__file__).parents[1] / "fixtures"
ROOT = Path(__file__).parents[2]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def evaluate(run: Path, task: str, *args: str) -> tuple[dict, list[dict]]:
    """(eval/<name>.json, the samples) after `lmforge eval RUN --task TASK ARGS`."""
    main(["eval", str(run), "--task", task, *args])
    name = Path(task).stem
    samples = (run / f"eval/{name}.samples.jsonl").read_text().splitlines()
    return json.loads((run / f"eval/{name}.json").read_text()), [json.loads(s) for s in samples]


def test_humaneval_reports_pass_at_1_and_writes_each_program(run):
    result, samples = evaluate(run, "humaneval", "--data", str(FIXTURES / "code_problems.jsonl"), "--limit", "2")
    assert result["n"] == 2 and result["skipped"] == {} and set(result["metrics"]) == {"pass@1"}
    assert result["contaminated"] is None  # the tiny run has no training shards to compare with
    assert [s["samples"][0]["task_id"] for s in samples] == ["Tiny/0", "Tiny/1"]
    for s in samples:
        [row] = s["samples"]
        assert row["n"] == 1 and row["samples"][0]["status"] in ("passed", "failed", "timeout")
        assert s["scores"]["pass@1"] == float(row["correct"])
    assert result["metrics"]["pass@1"] == sum(s["scores"]["pass@1"] for s in samples) / 2


def test_wmt_bleu_and_chrf_equal_sacrebleu_on_the_completions(run, tmp_path):
    from sacrebleu.metrics import BLEU, CHRF

    spec = yaml.safe_load((TASK_DIR / "wmt.yaml").read_text())
    assert spec["format"] == "parallel"
    pair = FIXTURES / "wmt22"  # German lines on both sides: the format is what is checked here
    spec |= {"data": str(pair / "en-de.ref.A.de"), "references": str(pair / "en-de.ref.B.de"), "max_tokens": 16}
    (tmp_path / "wmt.yaml").write_text(yaml.safe_dump(spec))
    result, samples = evaluate(run, str(tmp_path / "wmt.yaml"), "--limit", "3")
    refs = (pair / "en-de.ref.B.de").read_text().splitlines()[:3]
    assert [s["reference"] for s in samples] == refs
    assert samples[0]["prompt"].startswith("Translate German to English.\nGerman: ")
    hyps = [s["completion"] for s in samples]
    assert result["n"] == 3 and set(result["metrics"]) == {"bleu", "chrf"}
    assert result["metrics"]["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
    assert result["metrics"]["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)


def test_cnndm_rouge_and_bertscore_equal_nlg_on_the_completions(run, tmp_path):
    articles = [
        ("The council approved a new park in the city centre on Monday after a long debate.", "Council approves park."),
        ("Heavy rain flooded roads across the region, and schools closed for the day.", "Rain floods roads."),
        ("The team won the final in extra time, their first title in twenty years.", "Team wins first title."),
    ]
    data = tmp_path / "cnndm.jsonl"
    data.write_text("".join(json.dumps({"article": a, "highlights": h}) + "\n" for a, h in articles))
    result, samples = evaluate(run, "cnndm", "--data", str(data))
    hyps, refs = [s["completion"] for s in samples], [h for _, h in articles]
    assert [s["reference"] for s in samples] == refs and samples[0]["prompt"].endswith("\n\nTL;DR:")
    expected = {**nlg.rouge(hyps, refs), "bertscore_f1": nlg.bertscore_f1(hyps, refs)}
    assert result["metrics"] == pytest.approx(expected)


def test_advbench_refusal_rate_and_toxicity_of_the_completions(run):
    result, samples = evaluate(run, "advbench", "--data", str(FIXTURES / "eval/advbench_5.csv"))
    prompts, completions = [s["prompt"] for s in samples], [s["completion"] for s in samples]
    assert result["n"] == 5 and prompts[0].startswith("Develop a strategy for hacking")
    assert result["metrics"]["refusal_rate"] == safety.refusal_rate(prompts, completions)
    word_list = FIXTURES / "ldnoobw_en.txt"
    assert safety.LDNOOBW.read_bytes() == word_list.read_bytes()  # the shipped list is the fixture's, unchanged
    assert result["metrics"]["toxicity"] == safety.toxicity(completions, words=word_list)["word_hit_rate"]
    assert safety.toxicity(["what a bastard", "a fine day", "nice"], words=safety.LDNOOBW)["word_hit_rate"] == 1 / 3


def test_bias_probe_per_group_log_likelihoods_and_gaps(run, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's default data is the shipped bias_templates.json, relative to the repo
    result, samples = evaluate(run, "bias")
    model, tok = load_run(run)

    def loglik(texts: list[str]) -> list[float]:
        out = []
        for text in texts:
            ids = torch.tensor([[tok.bos_id, *tok.encode(text)]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids)[0].float(), -1)
            out.append(float(logprobs[:-1].gather(1, ids[0, 1:, None]).sum()))
        return out

    probes = safety.load_bias_probes()
    assert len(samples) == result["n"] == sum(len(safety.bias_pairs(*p)) for p in probes.values())
    expected = {}
    for name, probe in probes.items():
        gap = safety.bias_gap(loglik, safety.bias_pairs(*probe))
        expected |= {f"loglik/{name}/{g}": v for g, v in gap.items() if g != "gap"} | {f"gap/{name}": gap["gap"]}
    assert result["metrics"] == pytest.approx(expected, abs=1e-3)
    scores = json.loads((run / "eval.json").read_text())["scores"]
    assert not any("loglik" in k or "gap" in k for k in scores)  # log-likelihoods are not shares for the bar chart


def test_help_lists_every_task_and_every_task_file_loads(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in task_names():
        assert name in text
    assert {p.stem for p in TASK_DIR.glob("*.yaml")} == set(task_names()) >= {"bias", "canary"}


def test_bias_sentences_score_through_a_server_as_in_process(eval_run, live_server):
    from lmforge.eval.backends import Local
    from lmforge.eval.endpoint import Endpoint
    from lmforge.eval.families import likelihood
    from lmforge.eval.tasks import load_task, read_items
    from lmforge.serve.engine import Engine, EngineConfig
    from lmforge.serve.server import build_app

    model, tok = load_run(eval_run)
    task = load_task("bias")
    items = list(enumerate(read_items(task, safety.BIAS_TEMPLATES)))[::20]
    with live_server(build_app(Engine(model, tok, EngineConfig(block_size=8)), "tiny")) as url:
        remote = likelihood(task, Endpoint(url), items, [], 0)
    here = likelihood(task, Local(model, tok), items, [], 0)
    assert [s["ll"] for s in remote] == pytest.approx([s["ll"] for s in here], abs=1e-3)


def test_canary_task_on_a_run_without_canaries_exits_2_with_one_line(run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(run), "--task", "canary"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "has no canaries.json; pre-train with data.canaries=N" in err[0]
