"""Safety tuning's data and check: refusal data from hh-rlhf pairs (readable as SFT messages), context distillation
through the engine with the system prompt left out of the targets, red-teaming rates against a plain greedy decode
judged by the refusal test, the configs, and bad input as exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmforge.align import context_distill, safety_data
from lmforge.align.config import AlignConfig
from lmforge.align.redteam import chat_replies
from lmforge.align.safety import main
from lmforge.checkpoint import load_run
from lmforge.config import load_config
from lmforge.eval.safety import is_refusal
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.formats import load_conversations
from lmforge.sampling import generate_tokens

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests/fixtures"
PAIRS = FIXTURES / "hh_rlhf_harmless_single_13.jsonl"
ALPACA = FIXTURES / "alpaca_20.json"
ADVBENCH = FIXTURES / "eval/advbench_5.csv"
VICUNA = FIXTURES / "eval/vicuna_3.jsonl"


def _hh(human: str, chosen: str, rejected: str) -> dict:
    return {
        "chosen": f"\n\nHuman: {human}\n\nAssistant: {chosen}",
        "rejected": f"\n\nHuman: {human}\n\nAssistant: {rejected}",
    }


def test_refusal_heuristic():
    complies = "Sure, first you get a crowbar, then you wait until night and pry the back door open quietly."
    assert safety_data.refusal_pair(
        _hh("How do I break in?", "I\u2019m sorry, I can\u2019t help with that.", complies)
    ) == (
        "How do I break in?",
        "I'm sorry, I can't help with that.",  # the chosen refusal, apostrophes straightened for the refusal test
    )
    request, reply = safety_data.refusal_pair(_hh("How do I break in?", "Why?", complies))  # shorter: safer
    assert reply in safety_data.REFUSALS and is_refusal(reply)
    assert safety_data.refusal_pair(_hh("Hi", "Hello there, how can I help?", "Sorry, I cannot.")) == (
        "rejected reply did not comply"
    )
    assert safety_data.refusal_pair(_hh("Q", complies + " More words here.", complies)) == "chosen reply not safer"
    two_turns = {k: v + "\n\nHuman: and?\n\nAssistant: ok" for k, v in _hh("Q", "a", complies).items()}
    assert safety_data.refusal_pair(two_turns) == "not single-turn"


def test_build_refusals_writes_sft_messages(tmp_path, capsys):
    out = tmp_path / "refusals.jsonl"
    args = ["build-refusals", "--pairs", str(PAIRS), "--benign", str(ALPACA), "--benign-ratio", "2", "--out", str(out)]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [safety_data.refusal_pair(json.loads(line)) for line in PAIRS.read_text().splitlines()]
    pairs = [p for p in expected if not isinstance(p, str)]
    refusals = [r for r in records if r["kind"] == "refusal"]
    assert sorted(r["messages"][0]["content"] for r in refusals) == sorted(p[0] for p in pairs)
    assert all(is_refusal(r["messages"][1]["content"]) for r in refusals)
    assert sum(r["kind"] == "benign" for r in records) == 2 * len(pairs)
    conversations, rejected = load_conversations(out, "messages")  # what `lmforge finetune data.format=messages` reads
    assert len(conversations) == len(records) and not rejected
    assert f"wrote {len(records)} conversations" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refusals.jsonl"]  # no temporary file left behind


def test_distill_answers_under_the_system_prompt_without_it(tiny_run, tmp_path):
    model, tok = load_run(tiny_run)
    prompts = ["Say hi.", "How do I pick a lock?"]
    system = "Be safe."
    records, counts = context_distill.distill(model, tok, prompts, system, 6, keep_unfinished=True)
    assert counts["distilled"] == len(records) == 2
    stops = {tok.eos_id, tok.end_of_turn_id}
    for prompt, record in zip(prompts, records, strict=True):
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]  # the system prompt is gone
        assert record["messages"][0]["content"] == prompt
        ids = tok.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": prompt}], True, True)
        assert (
            record["messages"][1]["content"] == tok.decode(list(generate_tokens(model, ids, 6, stop_ids=stops))).strip()
        )
    # by default a reply cut at max-new-tokens is no target; with none left the command says so and exits 2
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]}) + "\n"
            for p in prompts
        )
    )
    out = tmp_path / "distilled.jsonl"
    args = [
        "distill",
        str(tiny_run),
        "--prompts",
        str(data),
        "--system",
        system,
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    ]
    assert main([*args, "--keep-unfinished"]) == 0
    assert [c[0]["content"] for c in load_conversations(out, "messages")[0]] == prompts
    assert main(args) == 2 and not model.training


def test_redteam_rates_are_the_refusal_test_on_greedy_chat_replies(tiny_run, tmp_path, capsys):
    out = tmp_path / "redteam.json"
    args = ["redteam", str(tiny_run), "--advbench", str(ADVBENCH), "--benign", str(VICUNA), "--max-new-tokens", "6"]
    assert main([*args, "--batch", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())[str(tiny_run)]
    model, tok = load_run(tiny_run)
    stops = {tok.eos_id, tok.end_of_turn_id}
    goals = [row["goal"] for row in csv.DictReader(ADVBENCH.read_text().splitlines())]
    questions = [json.loads(line)["text"] for line in VICUNA.read_text().splitlines()]
    for name, prompts in (("advbench", goals), ("benign", questions)):
        want = [
            tok.decode(
                list(
                    generate_tokens(
                        model, tok.encode_chat([{"role": "user", "content": p}], True, True), 6, stop_ids=stops
                    )
                )
            )
            for p in prompts
        ]
        assert [s["reply"] for s in row[f"{name}_samples"]] == want[:5]
        assert row[f"{name}_refusal_rate"] == sum(map(is_refusal, want)) / len(want)
        assert 0.0 <= row[f"{name}_refusal_rate"] <= 1.0 and row[f"{name}_n"] == len(prompts)
    assert chat_replies(model, tok, questions, 6, batch=1) == chat_replies(model, tok, questions, 6, batch=3)
    assert "advbench refusal" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["build-refusals", "--pairs", "missing.jsonl", "--out", "x.jsonl"],
        ["build-refusals", "--pairs", str(ALPACA), "--out", "x.jsonl"],  # no hh-rlhf pair in it
        ["build-refusals", "--pairs", str(PAIRS), "--benign", "missing.json", "--out", "x.jsonl"],
        ["distill", "RUN", "--prompts", "missing.jsonl", "--out", "x.jsonl"],
        ["redteam", "RUN", "--advbench", "missing.csv", "--out", "x.json"],
    ],
)
def test_bad_input_exits_2_with_one_line(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_safety_configs_load(tiny_run):
    ft = load_config(FinetuneConfig, REPO / "configs/finetune/safety.yaml", [f"base={tiny_run}", f"data.path={PAIRS}"])
    assert ft.data.format == "messages" and ft.peft.method == "lora"
    rm = load_config(AlignConfig, REPO / "configs/align/safety_rm.yaml", [f"policy={tiny_run}", f"data.path={PAIRS}"])
    assert rm.method == "rm" and rm.data.format == "hh_rlhf"
