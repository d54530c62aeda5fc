"""The `lmforge` command: one verb per stage (config + overrides) or tool (plain flags).

Run: `lmforge --help`. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from lmforge import report
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.run import Run

# Each verb's module is imported only when that verb runs: importing every stage costs seconds, paid by each command
# and by each torchrun rank. "module:name" names an attribute of a module.
# stages: the config dataclass and main(cfg, run) -> metrics
VERBS = {
    "pretrain": ("lmforge.train.pretrain:PretrainConfig", "lmforge.train.pretrain:main"),
    "speedrun": ("lmforge.speedrun:SpeedrunConfig", "lmforge.speedrun:main"),
    "finetune": ("lmforge.finetune.config:FinetuneConfig", "lmforge.finetune.sft:main"),
    "align": ("lmforge.align.config:AlignConfig", "lmforge.align.main:main"),
}
# tools: add_arguments(parser) and command(args)
TOOLS = {
    "generate": ("lmforge.serve.generate:add_arguments", "lmforge.serve.generate:command"),
    "chat": ("lmforge.serve.chat:add_arguments", "lmforge.serve.chat:command"),
    "serve": ("lmforge.serve.server:add_arguments", "lmforge.serve.server:command"),
    "export": ("lmforge.interop.hf:add_export_arguments", "lmforge.interop.hf:export_command"),
    "import": ("lmforge.interop.hf:add_import_arguments", "lmforge.interop.hf:import_command"),
    "report": ("lmforge.report:add_arguments", "lmforge.report:command"),
    "data": ("lmforge.data.prepare:add_arguments", "lmforge.data.prepare:command"),
    "plan": ("lmforge.train.plan:add_arguments", "lmforge.train.plan:command"),
    "tokenizer": ("lmforge.tokenizer.train:add_arguments", "lmforge.tokenizer.train:command"),
    "arena": ("lmforge.eval.arena:add_arguments", "lmforge.eval.arena:command"),
    "eval": ("lmforge.eval.cli:add_arguments", "lmforge.eval.cli:command"),
    "compress": ("lmforge.compress.cli:add_arguments", "lmforge.compress.cli:command"),
}


def load(name: str) -> Any:
    """The attribute "module:name", its module imported now."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def summary(name: str) -> str:
    """The first line of the docstring of the module of "module:name", read from its source without importing it."""
    origin = importlib.util.find_spec(name.partition(":")[0]).origin
    doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8"))) or ""
    return doc.splitlines()[0] if doc else ""


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of the CLI (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI's parser; of the tools only `verb`'s arguments are added (the others' modules stay unimported)."""
    parser = Parser(prog="lmforge", description="Train, sample and export language models.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (cfg_cls, _) in VERBS.items():
        p = verbs.add_parser(name, help=summary(cfg_cls))
        p.add_argument("--config", help="YAML file with the config sections")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run.name")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")
    for name, (add_arguments, command) in TOOLS.items():
        p = verbs.add_parser(name, help=summary(command))
        if name == verb:
            load(add_arguments)(p)
    return parser


def run_stage(verb: str, config: str | None, overrides: list[str], resume: bool = False) -> dict[str, float]:
    cfg_cls, stage_main = (load(name) for name in VERBS[verb])
    cfg = load_config(cfg_cls, config, overrides)  # validated before anything is written
    if resume:
        if not hasattr(cfg, "resume"):
            raise LmforgeError(f"`lmforge {verb}` cannot resume; drop --resume")
        cfg.resume = True
    run = Run.from_config(cfg.run)
    metrics = stage_main(cfg, run)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only the first process reports
        print(f"report: {report.write_report(run.path)}")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return metrics


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
    try:
        if args.verb in VERBS:
            run_stage(args.verb, args.config, args.overrides, args.resume)
        else:
            load(TOOLS[args.verb][1])(args)
    except LmforgeError as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
