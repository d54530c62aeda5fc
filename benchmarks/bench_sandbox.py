"""Code-sandbox throughput: trivial passing programs per second through `run_program` (namespaces, read-only mounts,
rlimits, a bootstrap interpreter in front of the program) against a bare `subprocess.run` of the same interpreter.

    .venv/bin/python benchmarks/bench_sandbox.py                  # 40 programs, 1 and 2 workers, ~10 s
    .venv/bin/python benchmarks/bench_sandbox.py --programs 200 --workers 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from lmforge.eval.code import program  # noqa: E402
from lmforge.eval.sandbox import run_program, sandbox_python  # noqa: E402

PROBLEM = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
SOURCE = program(PROBLEM, "    return a + b\n")


def bare(source: str) -> bool:
    """The peer: the same interpreter on the same program, no isolation at all."""
    with tempfile.TemporaryDirectory() as home:
        Path(home, "program.py").write_text(source)
        return subprocess.run([sandbox_python(), "-I", "-B", "program.py"], cwd=home).returncode == 0


def sandboxed(source: str) -> bool:
    return run_program(source).passed


def programs_per_second(programs: int = 40, workers: int = 2, run=sandboxed) -> float:
    """How many trivial passing programs `run` gets through per second with `workers` in parallel."""
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        assert all(pool.map(run, [SOURCE] * programs))
    return programs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"interpreter {sandbox_python()}, {args.programs} programs")
    for workers in args.workers:
        ours = programs_per_second(args.programs, workers, sandboxed)
        peer = programs_per_second(args.programs, workers, bare)
        print(
            f"workers {workers}: sandbox {ours:.1f} programs/s, bare subprocess {peer:.1f}/s, ratio {ours / peer:.2f}"
        )


if __name__ == "__main__":
    main()
