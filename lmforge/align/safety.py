"""Safety tuning's data and its check (Touvron et al., 2023, "Llama 2", section 4.2): refusal SFT data from hh-rlhf
harmless pairs, context distillation under a safety system prompt, and red-teaming before and after.

Run:
  python -m lmforge.align.safety build-refusals --pairs HH.jsonl.gz --benign ALPACA.json --out refusals.jsonl
  python -m lmforge.align.safety distill RUN --prompts refusals.jsonl --out distilled.jsonl
  python -m lmforge.align.safety redteam RUN [RUN ...] --out redteam.json [--advbench CSV] [--benign JSONL]
then `lmforge finetune --config configs/finetune/safety.yaml base=RUN data.path=refusals.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.align import context_distill, redteam, safety_data
from lmforge.errors import LmforgeError
from lmforge.run import atomic_write


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _build_refusals(args: argparse.Namespace) -> None:
    records, counts = safety_data.build_refusals(
        args.pairs, args.benign, args.benign_format, args.benign_ratio, args.seed, args.limit
    )
    write_jsonl(args.out, records)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"wrote {len(records)} conversations to {args.out}")


def _distill(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import load_run

    prompts = context_distill.read_prompts(args.prompts, args.format, args.limit)
    model, tokenizer = load_run(args.run)
    records, counts = context_distill.distill(
        model,
        tokenizer,
        prompts,
        args.system,
        args.max_new_tokens,
        args.temperature,
        args.seed,
        args.batch,
        args.keep_unfinished,
    )
    if not records:
        raise LmforgeError(f"no reply of {args.run} finished within --max-new-tokens={args.max_new_tokens}; raise it")
    write_jsonl(args.out, records)
    print(", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"wrote {len(records)} conversations to {args.out}")


def _redteam(args: argparse.Namespace) -> None:
    files = {"advbench": args.advbench, "benign": args.benign}
    suites = {name: redteam.suite_prompts(task, files[name], args.limit) for name, task in redteam.SUITES.items()}
    out = Path(args.out)
    results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}  # earlier runs are kept
    for run in args.runs:
        results[run] = redteam.redteam_run(run, suites, args.max_new_tokens, args.batch)
        atomic_write(out, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(redteam.table(results, list(suites)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmforge.align.safety", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-refusals", help="refusal SFT data from hh-rlhf harmless pairs, mixed with benign data")
    b.add_argument("--pairs", required=True, help="hh-rlhf {chosen, rejected} JSONL (optionally .gz)")
    b.add_argument("--benign", default="", help="helpful conversations mixed in (e.g. alpaca JSON)")
    b.add_argument("--benign-format", default="alpaca", help="alpaca, messages, prompt_completion or hh_rlhf")
    b.add_argument("--benign-ratio", type=float, default=1.0, help="benign conversations per refusal")
    b.add_argument("--limit", type=int, default=0, help="read at most this many pairs (0: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True)
    b.set_defaults(fn=_build_refusals)
    d = sub.add_parser("distill", help="answers under a safety system prompt, as SFT targets without it")
    d.add_argument("run", help="the policy run that answers")
    d.add_argument("--prompts", required=True, help="conversations whose first user turns are the prompts")
    d.add_argument("--format", default="messages", help="messages, alpaca, prompt_completion or hh_rlhf")
    d.add_argument("--system", default=context_distill.SAFETY_PROMPT)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--batch", type=int, default=64, help="prompts per engine call")
    d.add_argument("--limit", type=int, default=0)
    d.add_argument("--keep-unfinished", action="store_true", help="keep replies cut at --max-new-tokens")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.set_defaults(fn=_distill)
    r = sub.add_parser("redteam", help="refusal rate on AdvBench and on benign questions, per run")
    r.add_argument("runs", nargs="+", help="run folders")
    r.add_argument("--advbench", default=None, help="AdvBench CSV (goal column); default: configs/eval/advbench.yaml")
    r.add_argument("--benign", default=None, help="benign questions JSONL (text); default: overrefusal.yaml's")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--batch", type=int, default=64, help="prompts per engine call")
    r.add_argument("--limit", type=int, default=0, help="first N prompts of each suite (0: all)")
    r.add_argument("--out", required=True, help="JSON of the rates per run (runs already in it are kept)")
    r.set_defaults(fn=_redteam)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
