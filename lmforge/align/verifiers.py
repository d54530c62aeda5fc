"""Verifiable rewards: a reply scored 1 or 0 against its task by a checker (math-verify's equivalence of the final
answer, an exact match, or the reply's code run against the task's unit tests in the sandbox); a checker that raises
or runs out of time scores 0 and is counted by reason, never stopping the run."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.eval.sandbox import SandboxConfig, run_program

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CODE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass
class Task:
    prompt: list[dict[str, str]]
    """The chat messages before the reply (an optional system instruction, then the user's question)."""
    answer: str = ""
    """The target final answer (math, exact)."""
    tests: str = ""
    """Python unit tests (assert statements) run after the reply's code (python)."""


@dataclass
class Scores:
    rewards: list[float]
    failures: Counter = field(default_factory=Counter)
    """Replies whose checker failed, by reason: exception, timeout (and the sandbox's killed/error)."""


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def final_answer(text: str) -> str:
    """The reply's final answer: the text after the last '####' (its first line), else the last \\boxed{...}, else
    the last number; '' when there is none."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else ""


def normalise(answer: str) -> str:
    """Case, surrounding space and punctuation, thousands separators, '$' and a trailing '.0' dropped."""
    a = answer.strip().lower().replace(",", "").replace("$", "").rstrip(".").strip()
    return re.sub(r"^(-?\d+)\.0+$", r"\1", a)


def check_math(reply: str, task: Task, timeout_s: float) -> float:
    import math_verify

    pred = final_answer(reply)
    if _THOUSANDS.fullmatch(pred):
        pred = pred.replace(",", "")
    if not pred:
        return 0.0
    limit = max(1, math.ceil(timeout_s))  # math-verify's own limit is signal.alarm: whole seconds, main thread only
    wrap = lambda s: s if "\\" in s or "$" in s else f"${s}$"  # noqa: E731
    gold = math_verify.parse(wrap(task.answer), parsing_timeout=limit, raise_on_error=True)
    got = math_verify.parse(wrap(pred), parsing_timeout=limit, raise_on_error=True)
    return float(math_verify.verify(gold, got, timeout_seconds=limit, raise_on_error=True))


def check_exact(reply: str, task: Task, timeout_s: float) -> float:
    return float(normalise(final_answer(reply) or reply) == normalise(task.answer))  # a word answer: the whole reply


def code_of(reply: str) -> str:
    """The reply's last fenced code block, else the whole reply."""
    blocks = _CODE.findall(reply)
    return blocks[-1] if blocks else reply


def check_python(reply: str, task: Task, timeout_s: float) -> float:
    cfg = SandboxConfig(timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)), memory_mb=512, nproc=16)
    # the tests run even when the reply's code does not compile, so that they alone decide (a NameError fails them)
    program = (
        f"__ns = {{}}\ntry:\n    exec(compile({code_of(reply)!r}, 'reply.py', 'exec'), __ns)\n"
        "except Exception:\n    pass\n"
    )
    result = run_program(program + f"exec(compile({task.tests!r}, 'tests.py', 'exec'), __ns)\n", cfg)
    if result.status in ("timeout", "killed", "error"):
        raise _CheckerFailed(result.status)
    return float(result.passed)


class _CheckerFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


CHECKERS: dict[str, Callable[[str, Task, float], float]] = {
    "math": check_math,
    "exact": check_exact,
    "python": check_python,
}


def score(replies: list[str], tasks: list[Task], checker: str, timeout_s: float) -> Scores:
    """Reward of each reply against its task (1 right, 0 wrong or failed), the failures counted by reason."""
    check = CHECKERS[checker]
    out = Scores([])
    for reply, task in zip(replies, tasks, strict=True):
        try:
            out.rewards.append(check(reply, task, timeout_s))
        except _CheckerFailed as e:
            out.rewards.append(0.0)
            out.failures[e.reason] += 1
        except Exception as e:  # noqa: BLE001 - any checker error scores 0; math-verify times out with its own class
            out.rewards.append(0.0)
            out.failures["timeout" if "timeout" in type(e).__name__.lower() else "exception"] += 1
    return out
