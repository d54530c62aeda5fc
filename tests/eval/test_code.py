"""pass@k against its closed form and human-eval's formula; HumanEval-format problems run in the sandbox."""

import json
import math
from pathlib import Path

import pytest
from lm_eval.tasks.cruxeval.utils import _pass_at_k as human_eval_pass_at_k  # human-eval's numpy formula

from lmforge.errors import LmforgeError
from lmforge.eval.code import load_problems, pass_at_k, program, run_problems
from lmforge.eval.sandbox import SandboxConfig

FIXTURE = Path(__file__).parent.parent / "fixtures" / "code_problems.jsonl"


def test_pass_at_k_matches_closed_form_and_human_eval():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(human_eval_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    # Large n: the binomials are ~1e299, the product stays exact enough.
    assert pass_at_k(1000, 1, 100) == pytest.approx(0.1)
    with pytest.raises(LmforgeError, match="k <= n"):
        pass_at_k(5, 2, 6)


def test_load_problems_and_errors(tmp_path):
    problems = load_problems(FIXTURE)
    assert [p["task_id"] for p in problems] == ["Tiny/0", "Tiny/1", "Tiny/2", "Tiny/3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "a", "prompt": "p"}) + "\n")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:1: missing or non-string test, entry_point"):
        load_problems(bad)
    bad.write_text("{not json\n")
    with pytest.raises(LmforgeError, match="bad.jsonl:1: not JSON"):
        load_problems(bad)
    bad.write_text("\n")
    with pytest.raises(LmforgeError, match="no problems"):
        load_problems(bad)


def test_run_problems_canonical_pass_and_wrong_fail():
    problems = load_problems(FIXTURE)
    by_prompt = {p["prompt"]: p for p in problems}

    def generate(prompt: str, n: int) -> list[str]:  # 2 right, 1 wrong (the last problem's wrong one never ends)
        p = by_prompt[prompt]
        return [p["canonical_solution"], p["wrong_solution"], p["canonical_solution"]][:n]

    # 8 s: a right program takes ~0.1 s alone, but CI runs torchrun tests beside this one (2 s once timed one out)
    metrics, rows = run_problems(problems, generate, n=3, ks=[1, 2, 5], sandbox=SandboxConfig(timeout_s=8))
    assert set(metrics) == {"pass@1", "pass@2"}  # k > n is left out
    assert metrics["pass@1"] == pytest.approx(2 / 3)
    assert metrics["pass@2"] == pytest.approx(pass_at_k(3, 2, 2)) == pytest.approx(1.0)
    assert [r["correct"] for r in rows] == [2, 2, 2, 2]
    statuses = [[s["status"] for s in r["samples"]] for r in rows]
    assert statuses[:3] == [["passed", "failed", "passed"]] * 3
    assert statuses[3] == ["passed", "timeout", "passed"]
    assert "AssertionError" in rows[0]["samples"][1]["stderr"]


def test_program_layout_and_generate_contract():
    problem = load_problems(FIXTURE)[0]
    assert program(problem, "    return a + b\n").endswith("\ncheck(add)\n")
    with pytest.raises(LmforgeError, match="returned 1 completions for Tiny/0, expected n=2"):
        run_problems([problem], lambda prompt, n: ["    return a + b\n"], n=2, ks=[1])
