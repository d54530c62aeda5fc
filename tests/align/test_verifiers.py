"""Checkers: math-verify's equivalences on the final answer, exact matches, and code run against unit tests in the
sandbox, where a raising or hanging check scores 0 and is counted by reason."""

from __future__ import annotations

import math_verify

from lmforge.align.verifiers import Task, code_of, final_answer, score

ASK = [{"role": "user", "content": "?"}]


def test_final_answer_prefers_hashes_then_boxed_then_the_last_number():
    assert final_answer("so 3 + 4 = 7\n#### 7\nbye 9") == "7"
    assert final_answer("x is \\boxed{\\frac{1}{2}} or 3") == "\\frac{1}{2}"
    assert final_answer("first 12, then 1,234 apples.") == "1234"
    assert final_answer("no digits") == ""


def test_math_checker_agrees_with_math_verify_on_equivalent_forms():
    cases = [("#### 0.5", "1/2"), ("\\boxed{\\frac{1}{2}}", "0.5"), ("It is 1,234.", "1234"), ("#### 72", "72.0")]
    wrong = [("#### 0.6", "1/2"), ("the answer is 71", "72"), ("I don't know", "3")]
    got = score([r for r, _ in cases + wrong], [Task(ASK, a) for _, a in cases + wrong], "math", 5.0)
    assert got.rewards == [1.0] * len(cases) + [0.0] * len(wrong) and not got.failures
    assert math_verify.verify(math_verify.parse("$1/2$"), math_verify.parse("$0.5$"))  # the reference itself


def test_exact_checker_normalises_the_final_answer():
    got = score(["#### 42.", "it is $1,000", "#### 43", "Paris"], [Task(ASK, a) for a in ("42", "1000", "42", "paris")],
                "exact", 5.0)  # fmt: skip
    assert got.rewards == [1.0, 1.0, 0.0, 1.0]


def test_a_checker_that_raises_scores_zero_and_is_counted():
    got = score(["#### 3", "#### 3"], [Task(ASK, None), Task(ASK, "3")], "math", 5.0)  # a task without its answer
    assert got.rewards == [0.0, 1.0] and got.failures == {"exception": 1}


def test_python_checker_passes_fails_and_times_out():
    tests = "assert add(2, 3) == 5\n"
    replies = [
        "Here:\n```python\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\ndef add(a, b):\n    raise ValueError('no')\n```",
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",
    ]
    got = score(replies, [Task(ASK, tests=tests)] * 4, "python", 2.0)
    assert got.rewards == [1.0, 0.0, 0.0, 0.0]
    assert got.failures == {"timeout": 1} or got.failures == {"killed": 1}  # wall clock or the CPU limit, first
    assert code_of("no fence: x = 1") == "no fence: x = 1"
