"""`lmforge compress report BASE OUT... --text FILE`: each compressed run against its base, one row each: weights on
disk, peak resident memory, decode speed at batch 1 and over 32 concurrent requests, perplexity on a text and one
task score, with the ratios to the base; printed as a markdown table and written as compress_report.md and .json.

Run: lmforge compress report runs/smol runs/smol-int8 runs/smol-int4 --text wiki.txt --chars 100000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lmforge
from lmforge import cli_args
from lmforge import report as run_report
from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.compress.store import COMPRESSION
from lmforge.errors import LmforgeError
from lmforge.run import Run, atomic_write, resolve_run

CONCURRENT = 32
MEMORY = (
    "peak resident set (VmHWM) of a fresh Python process that imports lmforge, loads the run and greedily decodes "
    "--tokens tokens at batch 1; the batch-1 speed is that process's, after the first token"
)


def parse(argv: list[str]) -> argparse.Namespace:
    from lmforge.cli import Parser  # not at the top: the decoding process imports this module and nothing more

    p = Parser(prog="lmforge compress report", description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the uncompressed run (folder or name under runs/)")
    p.add_argument("outs", nargs="+", metavar="OUT", help="compressed runs of it (lmforge compress BASE ...)")
    p.add_argument("--text", required=True, help="plain text file: perplexity, prompts and the default task's items")
    p.add_argument("--chars", type=cli_args.int_in(1000), default=100_000, help="characters of it used (100000)")
    p.add_argument("--task", help="an eval task name or YAML (default: next_line, items built from --text)")
    p.add_argument("--task-data", help="data file of --task (default: the task's own)")
    p.add_argument("--limit", type=cli_args.int_in(1), default=100, help="task items scored (default 100)")
    p.add_argument("--tokens", type=cli_args.int_in(2), default=64, help="tokens decoded per request (default 64)")
    p.add_argument("--out", help="folder for compress_report.md/.json (default: the first OUT run)")
    return p.parse_args(argv)


def method_of(run: Path) -> str | None:
    """The method a run was compressed with (compress.json, else its checkpoint's compression.json); None if plain."""
    for path in (run / "compress.json", (latest_checkpoint(run) or run) / COMPRESSION):
        if path.is_file():
            return json.loads(path.read_text()).get("method")
    return None


def weights_file(run: Path) -> Path:
    ckpt = latest_checkpoint(run)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise LmforgeError(f"run {run} has no checkpoint with model.safetensors; train or compress it first")
    return ckpt / "model.safetensors"


def probe(run: Path, prompt: list[int], tokens: int) -> dict[str, Any]:
    """Peak RSS and batch-1 greedy decode speed, measured in a fresh process (this one holds other models)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(lmforge.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    code = "import sys; from lmforge.compress.report import _probe_main; _probe_main(*sys.argv[1:])"
    args = [sys.executable, "-c", code, str(run), json.dumps(prompt), str(tokens)]
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode:
        raise LmforgeError(f"decoding {run} in a fresh process failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_main(run: str, prompt: str, tokens: str) -> None:
    import resource

    from lmforge.cpu.allowlist import unsupported_reason
    from lmforge.serve.generate import generate_tokens

    model, _ = load_run(run)
    stream = generate_tokens(model, json.loads(prompt), int(tokens), temperature=0.0)
    next(stream)  # the prompt's forward pass
    start = time.perf_counter()
    n = sum(1 for _ in stream)
    seconds = time.perf_counter() - start
    # Linux keeps ru_maxrss across fork and exec (it would report the parent's peak); VmHWM is this process's own
    status = Path("/proc/self/status")
    hwm = (
        [line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM")]
        if status.exists()
        else []
    )
    rss = int(hwm[0]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    backend = "torch" if unsupported_reason(model) else "numpy"
    print(json.dumps({"peak_rss_bytes": rss, "decode_tok_s": n / seconds, "decode_backend": backend}))


def concurrent_tok_s(model, tokenizer, prompts: list[list[int]], tokens: int) -> tuple[float, str]:
    """Total generated tokens per second of the serving engine over len(prompts) greedy requests at once."""
    from lmforge.serve.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=len(prompts), kv_budget_gib=1.0))
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0))
    return sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start), type(engine.runner).__name__


def task_score(model, tokenizer, args: argparse.Namespace, text: str) -> tuple[str, float]:
    """(task metric, value) of the model on --task (or next_line from the text), first --limit items."""
    from lmforge.eval.backends import Local
    from lmforge.eval.families import FAMILIES, aggregate
    from lmforge.eval.heldout import next_line_items
    from lmforge.eval.tasks import load_task, read_items

    task = load_task(args.task or "next_line")
    items = read_items(task, args.task_data or task.data) if args.task else next_line_items([text], args.limit)
    batch = list(enumerate(items[: args.limit]))
    samples = FAMILIES[task.family](task, Local(model, tokenizer), batch, items, task.few_shot.k)
    metrics, _ = aggregate(task, samples)
    metric = task.metrics[0]
    return f"{task.name} {metric}", metrics.get(metric, math.nan)


def measure(run: Path, method: str, args: argparse.Namespace, text: str) -> dict[str, Any]:
    from lmforge.eval.backends import Local

    start = time.perf_counter()
    model, tokenizer = load_run(run)
    ids = tokenizer.encode(text)
    width = max(8, min(32, len(ids) // CONCURRENT))  # consecutive pieces of the text
    prompts = [[tokenizer.bos_id, *ids[i * width : (i + 1) * width]] for i in range(CONCURRENT)]
    row: dict[str, Any] = {"run": run.name, "method": method, "size_bytes": weights_file(run).stat().st_size}
    row |= probe(run, prompts[0], args.tokens)
    row[f"decode_tok_s_{CONCURRENT}"], row["engine_runner"] = concurrent_tok_s(model, tokenizer, prompts, args.tokens)
    nll, n = Local(model, tokenizer).rolling_nll(text)
    row["ppl"] = math.exp(nll / n)
    row["task"], row["score"] = task_score(model, tokenizer, args, text)
    print(
        f"{run.name}: ppl {row['ppl']:.3f}, measured in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return row


RATIOS = ("size_bytes", "peak_rss_bytes", "decode_tok_s", f"decode_tok_s_{CONCURRENT}", "ppl")


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = rows[0]
    for row in rows:
        row |= {f"{k}_ratio": row[k] / base[k] for k in RATIOS}
        row["score_delta"] = row["score"] - base["score"]
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    mib = 2**20
    head = ["run", "method", "weights MiB", "RSS MiB", "tok/s b=1", f"tok/s b={CONCURRENT}", "ppl", rows[0]["task"]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [
            r["run"],
            r["method"],
            f"{r['size_bytes'] / mib:.1f} ({r['size_bytes_ratio']:.2f}x)",
            f"{r['peak_rss_bytes'] / mib:.0f} ({r['peak_rss_bytes_ratio']:.2f}x)",
            f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_ratio']:.2f}x)",
            f"{r[f'decode_tok_s_{CONCURRENT}']:.1f} ({r[f'decode_tok_s_{CONCURRENT}_ratio']:.2f}x)",
            f"{r['ppl']:.3f} ({100 * (r['ppl_ratio'] - 1):+.2f}%)",
            f"{r['score']:.3f} ({r['score_delta']:+.3f})",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def command(argv: list[str]) -> None:
    args = parse(argv)
    base = resolve_run(args.base)
    if method_of(base) is not None:
        raise LmforgeError(f"BASE {base} is itself compressed ({method_of(base)}); give the run it was compressed from")
    runs = [(base, "base")]
    for out in args.outs:
        path = resolve_run(out)
        method = method_of(path)
        if method is None:
            raise LmforgeError(f"{path} is not a compressed run (no compress.json); make one with lmforge compress")
        runs.append((path, method))
    for path, _ in runs:
        weights_file(path)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise LmforgeError(f"--text {text_path} is not a file; give a plain text file for perplexity and prompts")
    text = text_path.read_text(encoding="utf-8")[: args.chars]
    if args.task:
        from lmforge.eval.tasks import load_task

        task = load_task(args.task)
        if not (args.task_data or task.data):
            raise LmforgeError(f"task {task.name} has no default data file; pass one with --task-data")
    rows = with_ratios([measure(path, method, args, text) for path, method in runs])
    markdown = table(rows)
    print(markdown, end="")
    out = Run(args.out or runs[1][0])
    settings = {k: v for k, v in vars(args).items() if k not in ("base", "outs")}
    settings["task"] = args.task or "next_line, items built from --text"
    out.write_json("compress_report.json", {"base": str(base), **settings, "memory": MEMORY, "rows": rows})
    intro = f"Base `{base}`; perplexity on the first {len(text):,} characters of `{args.text}`. Memory: {MEMORY}.\n\n"
    atomic_write(out.file("compress_report.md"), f"# Compression report\n\n{intro}{markdown}")
    if method_of(out.path) is not None:  # a run folder: its report.md gets the comparison as a section
        run_report.write_report(out.path)
    print(f"wrote {out.file('compress_report.md')} and compress_report.json")
