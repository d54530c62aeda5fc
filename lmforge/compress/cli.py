"""`lmforge compress BASE method=NAME [key=value ...]` compresses a run; `lmforge compress report BASE OUT...`
compares compressed runs with their base (size, memory, decode speed, perplexity, a task score)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from lmforge import report as run_report
from lmforge.compress import main as compress_main
from lmforge.compress.config import CompressConfig
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.run import Run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the config sections")
    parser.add_argument(
        "args",
        nargs=argparse.REMAINDER,  # `report`'s own flags (--text ...) pass through to its parser
        metavar="BASE key=value | report BASE OUT",
        help="the run to compress and overrides (method=int8|int4|gptq|awq|nf4|ternary|magnitude|wanda|sparsegpt|"
        "structured|distill|lowrank|share, run.name=OUT, quant.*, prune.*, ...); or `report BASE OUT...` "
        "(see `lmforge compress report --help`)",
    )


def command(args: argparse.Namespace) -> None:
    if not args.args:
        raise LmforgeError("name the run to compress: lmforge compress BASE method=NAME ... (or `report BASE OUT...`)")
    if args.args[0] == "report":
        from lmforge.compress import report

        report.command(args.args[1:])
        return
    base, *overrides = args.args
    if "=" in base:
        raise LmforgeError(f"the first argument must be the base run, not {base!r} (lmforge compress BASE key=value)")
    cfg = load_config(CompressConfig, args.config, [f"base={base}", *overrides])
    path = Path(cfg.run.root) / cfg.run.name
    existed = path.exists()
    run = Run.from_config(cfg.run)
    try:
        metrics = compress_main.main(cfg, run)
    except BaseException:
        if not existed:  # a method that does not apply (or a crash) leaves no half-made run behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    if os.environ.get("RANK", "0") == "0":
        print(f"report: {run_report.write_report(run.path)}")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
