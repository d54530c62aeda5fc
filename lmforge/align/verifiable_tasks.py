"""Tasks with checkable answers for GRPO: generated ones (multi-digit arithmetic, templated word problems) split into
train and held-out by a hash of each question, so the two never share one, or read from GSM8K or task JSONL files."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

from lmforge.align.verifiers import Task
from lmforge.errors import LmforgeError

INSTRUCTION = "Answer with the number only, after '####'."

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _held_out(question: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _arithmetic(rng: random.Random, digits: int, terms: int, ops: str) -> tuple[str, int]:
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    values = [rng.randint(lo, hi) for _ in range(terms)]
    chosen = [rng.choice(ops) for _ in range(terms - 1)]
    text = str(values[0]) + "".join(f" {op} {v}" for op, v in zip(chosen, values[1:], strict=True))
    return f"What is {text}?", eval(text)  # noqa: S307 - our own digits and operators, precedence as written


_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar", "Priya", "Sam"]
_THINGS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "coins"]


def _word_problem(rng: random.Random, digits: int, terms: int, ops: str) -> tuple[str, int]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    hi = 10**digits - 1
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    kind = rng.choice([k for k in ("+", "-", "*") if k in ops] or ["+"])
    if kind == "+":
        return f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?", a + b
    if kind == "-":
        a, b = max(a, b), min(a, b)
        return f"{name} has {a} {thing} and gives away {b} of them. How many {thing} are left?", a - b
    b = rng.randint(2, 9)
    return f"{name} buys {b} boxes with {a} {thing} in each box. How many {thing} does {name} buy?", a * b


GENERATORS = {"arithmetic": _arithmetic, "word_problems": _word_problem}


def chat(question: str, system: str, instruction: str = "") -> list[dict[str, str]]:
    """The prompt: an optional system message, then the question with the answer-format instruction after it."""
    user = f"{question} {instruction}" if instruction else question
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def generate_tasks(
    kind: str,
    n: int,
    split: str,
    seed: int,
    val_fraction: float = 0.1,
    digits: int = 2,
    terms: int = 2,
    ops: str = "+",
    system: str = "",
    instruction: str = INSTRUCTION,
) -> list[Task]:
    """`n` distinct tasks of `kind` from `split` ('train' or 'held_out'; a question's hash picks its side)."""
    rng = random.Random(f"{kind}/{seed}/{split}")
    seen: set[str] = set()
    tasks: list[Task] = []
    for _ in range(200 * n + 1000):
        question, answer = GENERATORS[kind](rng, digits, terms, ops)
        if question in seen or _held_out(question, val_fraction) != (split == "held_out"):
            continue
        seen.add(question)
        tasks.append(Task(chat(question, system, instruction), str(answer)))
        if len(tasks) == n:
            return tasks
    raise LmforgeError(
        f"grpo.task={kind} with {digits} digits and {terms} terms has too few distinct {split} questions for {n}; "
        "raise grpo.digits or lower the task counts"
    )


def _records(path: str, limit: int) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return records[:limit] if limit else records


def read_tasks(
    path: str, fmt: str, system: str = "", instruction: str = "", limit: int = 0
) -> tuple[list[Task], Counter]:
    """Tasks from a gsm8k ({question, answer '... #### N'}) or tasks ({prompt, answer} or {prompt, tests}) file, the
    prompt a string or a message list; records without a checkable answer are counted by reason."""
    tasks, rejected = [], Counter()
    for record in _records(path, limit):
        if fmt == "gsm8k":
            question, answer = record.get("question"), str(record.get("answer", ""))
            if not question or "####" not in answer:
                rejected["no question or no '#### N' answer"] += 1
                continue
            tasks.append(
                Task(chat(question, system, instruction), answer.rsplit("####", 1)[1].strip().replace(",", ""))
            )
            continue
        prompt = record.get("prompt")
        if not prompt or not (record.get("answer") not in (None, "") or record.get("tests")):
            rejected["no prompt or neither answer nor tests"] += 1
            continue
        messages = chat(prompt, system, instruction) if isinstance(prompt, str) else list(prompt)
        tasks.append(Task(messages, str(record.get("answer", "")), record.get("tests", "")))
    return tasks, rejected


def split_tasks(tasks: list[Task], val_fraction: float) -> tuple[list[Task], list[Task]]:
    """(train, held_out) by a hash of each task's last user message."""
    train, held = [], []
    for task in tasks:
        (held if _held_out(task.prompt[-1]["content"], val_fraction) else train).append(task)
    return train, held
