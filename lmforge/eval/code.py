"""Functional correctness of generated code: HumanEval-format problems run in the sandbox, scored with the unbiased
pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374)."""

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmforge.config import check
from lmforge.errors import LmforgeError
from lmforge.eval.sandbox import SandboxConfig, run_program

FIELDS = ("task_id", "prompt", "test", "entry_point")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them correct, is correct:
    1 - C(n-c, k) / C(n, k), computed as a product so that large n neither overflows nor cancels."""
    check(0 <= c <= n and 1 <= k <= n, f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def check_problem(problem: dict, where: str) -> None:
    missing = [f for f in FIELDS if not isinstance(problem.get(f), str)]
    if missing:
        raise LmforgeError(f"{where}: missing or non-string {', '.join(missing)}; a problem needs {', '.join(FIELDS)}")


def load_problems(path: str | Path) -> list[dict]:
    """Read a HumanEval-format JSONL file: one problem per line with task_id, prompt, test and entry_point."""
    problems = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            problem = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{i}: not JSON ({e.msg}); write one problem object per line") from None
        if not isinstance(problem, dict):
            raise LmforgeError(f"{path}:{i}: expected a JSON object with {', '.join(FIELDS)}")
        check_problem(problem, f"{path}:{i}")
        problems.append(problem)
    check(bool(problems), f"{path}: no problems; write one HumanEval-format JSON object per line")
    return problems


def program(problem: dict, completion: str) -> str:
    """The program HumanEval runs: the prompt, the model's completion, the tests, and a call of the checker."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def run_problems(
    problems: list[dict],
    generate_fn: Callable[[str, int], list[str]],
    n: int,
    ks: list[int],
    sandbox: SandboxConfig | None = None,
    workers: int = 2,
) -> tuple[dict[str, float], list[dict]]:
    """Sample n completions per problem, run each program in the sandbox, and return ({"pass@k": mean over problems}
    for k = 1 and each k in ks up to n, one row per problem). Programs run while later problems are generated."""
    check(bool(problems), "run_problems got no problems")
    check(n >= 1, f"n must be >= 1, got {n}")
    check(all(k >= 1 for k in ks), f"every k in ks must be >= 1, got {ks}")
    check(workers >= 1, f"workers must be >= 1, got {workers}")
    for i, problem in enumerate(problems):
        check_problem(problem, f"problem {i}")
    # Each program runs in its own process; threads only wait for them, so a thread pool is the process pool.
    with ThreadPoolExecutor(workers) as pool:
        jobs = []
        for problem in problems:
            completions = generate_fn(problem["prompt"], n)
            check(
                len(completions) == n,
                f"generate_fn returned {len(completions)} completions for {problem['task_id']}, expected n={n}",
            )
            jobs.append([(c, pool.submit(run_program, program(problem, c), sandbox)) for c in completions])
        rows = []
        for problem, samples in zip(problems, jobs, strict=True):
            results = [(c, job.result()) for c, job in samples]
            errors = [r.stderr for _, r in results if r.status == "error"]
            if errors:
                raise LmforgeError(f"the code sandbox could not start: {errors[0].splitlines()[0]}")
            rows.append({
                "task_id": problem["task_id"],
                "n": n,
                "correct": sum(r.passed for _, r in results),
                "samples": [
                    {"completion": c, "status": r.status, "wall_s": round(r.wall_s, 3), "stderr": r.stderr[-500:]}
                    for c, r in results
                ],
            })  # fmt: skip
    metrics = {}
    for k in sorted({1, *ks}):
        if k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, row["correct"], k) for row in rows) / len(rows)
    return metrics, rows
