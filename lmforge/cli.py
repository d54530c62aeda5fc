"""The `lmforge` command: one verb per stage (config + overrides) or tool (plain flags).

Run: `lmforge --help`. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from lmforge import report
from lmforge.align import main as align
from lmforge.align.config import AlignConfig
from lmforge.compress import cli as compress_cli
from lmforge.config import load_config
from lmforge.data import prepare
from lmforge.errors import LmforgeError
from lmforge.eval import arena
from lmforge.eval import cli as eval_cli
from lmforge.finetune import sft
from lmforge.finetune.config import FinetuneConfig
from lmforge.interop import hf
from lmforge.run import Run
from lmforge.serve import chat, generate, server
from lmforge.speedrun import SpeedrunConfig
from lmforge.speedrun import main as speedrun_main
from lmforge.tokenizer import train as tokenizer_train
from lmforge.train import plan
from lmforge.train.pretrain import PretrainConfig
from lmforge.train.pretrain import main as pretrain_main

# stages: a config dataclass and main(cfg, run) -> metrics
VERBS = {
    "pretrain": (PretrainConfig, pretrain_main),
    "speedrun": (SpeedrunConfig, speedrun_main),
    "finetune": (FinetuneConfig, sft.main),
    "align": (AlignConfig, align.main),
}
# tools: add_arguments(parser) and command(args)
TOOLS = {
    "generate": (generate.add_arguments, generate.command),
    "chat": (chat.add_arguments, chat.command),
    "serve": (server.add_arguments, server.command),
    "export": (hf.add_export_arguments, hf.export_command),
    "import": (hf.add_import_arguments, hf.import_command),
    "report": (report.add_arguments, report.command),
    "data": (prepare.add_arguments, prepare.command),
    "plan": (plan.add_arguments, plan.command),
    "tokenizer": (tokenizer_train.add_arguments, tokenizer_train.command),
    "arena": (arena.add_arguments, arena.command),
    "eval": (eval_cli.add_arguments, eval_cli.command),
    "compress": (compress_cli.add_arguments, compress_cli.command),
}


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of the CLI (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmforge", description="Train, sample and export language models.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (cfg_cls, _) in VERBS.items():
        p = verbs.add_parser(name, help=(sys.modules[cfg_cls.__module__].__doc__ or "").splitlines()[0])
        p.add_argument("--config", help="YAML file with the config sections")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run.name")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override a config value")
    for name, (add_arguments, command) in TOOLS.items():
        p = verbs.add_parser(name, help=(sys.modules[command.__module__].__doc__ or "").splitlines()[0])
        add_arguments(p)
    return parser


def run_stage(verb: str, config: str | None, overrides: list[str], resume: bool = False) -> dict[str, float]:
    cfg_cls, stage_main = VERBS[verb]
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
    args = build_parser().parse_args(argv)
    try:
        if args.verb in VERBS:
            run_stage(args.verb, args.config, args.overrides, args.resume)
        else:
            TOOLS[args.verb][1](args)
    except LmforgeError as e:
        print(f"lmforge {args.verb}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
