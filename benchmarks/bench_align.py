"""Alignment speed against TRL, both methods the issue names, each ours and TRL's in one run on the same machine:
GRPO seconds per step (bench_align_grpo.py, target >= 3x TRL's GRPOTrainer) and DPO pairs/s (bench_align_dpo.py,
targets >= 1.5x TRL's DPOTrainer defaults and >= 1.0x its fastest settings). Extra arguments go to both.

    .venv/bin/python benchmarks/bench_align.py              # both, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_align.py --only grpo --steps 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {"grpo": "bench_align_grpo.py", "dpo": "bench_align_dpo.py"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SCRIPTS), help="run one of the two")
    args, rest = parser.parse_known_args()
    status = 0
    for name, script in SCRIPTS.items():
        if args.only in (None, name):
            print(f"== {name}: {script} {' '.join(rest)}", flush=True)
            status |= subprocess.call([sys.executable, str(HERE / script), *rest])
    sys.exit(status)


if __name__ == "__main__":
    main()
