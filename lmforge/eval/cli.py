"""Evaluate a run or an OpenAI-compatible server on tasks from configs/eval/ (or any task YAML).

Run: `lmforge eval RUN --task hellaswag piqa [--data FILE] [--limit N] [--shots K] [--batch-size B]`
Results land in runs/<run>/eval/<task>.json with one line per item in eval/<task>.samples.jsonl, appended as items
are scored: an interrupted evaluation resumes from the items already there. eval.json and eval_config.json at the run
root make the report's eval section. For a run with training shards, each result counts the items that share a word
13-gram with its training data ("contaminated"; eval/contamination.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmforge import cli_args
from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.eval.families import FAMILIES, aggregate
from lmforge.eval.tasks import Task, load_task, read_items, task_names
from lmforge.run import Run, resolve_run

# what the report's bar chart leaves out: not metrics, or not shares in [0, 1] (bias: "loglik/<probe>/<group>")
NOT_SHARES = {"task", "n", "ppl", "bits_per_byte", "bleu", "chrf", "loglik", "gap", "exposure_planted",
              "exposure_control"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder or name under runs/, or the URL of an OpenAI-compatible server")
    names = ", ".join(task_names())
    parser.add_argument("--task", nargs="+", required=True, help=f"task names ({names}) or task YAML files")
    parser.add_argument("--data", help="data file (one task only; default: the task's `data`)")
    parser.add_argument("--limit", type=cli_args.int_in(1), help="score only the first N items")
    parser.add_argument("--shots", type=cli_args.int_in(0), help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=cli_args.int_in(1), default=8, help="items per forward pass")
    parser.add_argument("--out", help="folder for the results (default: the run folder; for a URL runs/<host>)")
    parser.add_argument("--model", default="", help="model name at the server (default: its first)")
    parser.add_argument("--api-key", default="", help="the server's API key, if it asks for one")


def command(args: argparse.Namespace) -> None:
    if args.data and len(args.task) > 1:
        raise LmforgeError("--data names the file of one task; give one --task with it, or drop --data")
    tasks = [load_task(name) for name in args.task]  # every task file checked before the model loads
    backend, model_id, run, source = open_backend(args)
    results = []
    for t in tasks:
        data = task_data(t, args.data, source)
        results.append(evaluate(run, t, backend, model_id, data, args.limit, args.shots, args.batch_size, source))
    config = {k: v for k, v in vars(args).items() if k not in ("verb", "run", "api_key") and not callable(v)}
    write_summary(run, {"evaluated": args.run, **config}, results)
    for r in results:
        print(json.dumps({"task": r["task"], "n": r["n"], **{k: round(v, 4) for k, v in r["metrics"].items()}}))


def open_backend(args: argparse.Namespace):
    """(backend, a string naming the model for the resume check, the run folder the results go to, the run folder
    of the model or None for a server)."""
    if args.run.startswith(("http://", "https://")):
        from lmforge.eval.endpoint import Endpoint

        backend = Endpoint(args.run, args.model, api_key=args.api_key)
        host = urlparse(args.run)
        out = Path(args.out or Path("runs") / f"{host.hostname}-{host.port or 80}")
        return backend, f"{args.run} {backend.model}", Run(out), None
    from lmforge.checkpoint import latest_checkpoint, load_run
    from lmforge.eval.backends import Local

    run_dir = resolve_run(args.run)
    model, tokenizer = load_run(run_dir)
    ckpt = latest_checkpoint(run_dir)
    return Local(model, tokenizer, args.batch_size), str(ckpt), Run(args.out or run_dir), Path(run_dir)


def task_data(task: Task, data: str | None, source: Path | None) -> str:
    """--data, else the task's file; a canaries task without one reads the evaluated run's own canaries.json."""
    if not data and not task.data and task.format == "canaries" and source is not None:
        if not (source / "canaries.json").is_file():
            raise LmforgeError(f"{source} has no canaries.json; pre-train with data.canaries=N to plant some")
        return str(source / "canaries.json")
    return data or task.data


def evaluate(run: Run, task: Task, backend, model_id: str, data: str, limit: int | None, shots: int | None,
             batch_size: int = 8, source: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Score the task's items not yet in eval/<task>.samples.jsonl, append them, and write eval/<task>.json."""
    if not data:
        raise LmforgeError(f"task {task.name} has no default data file; pass one with --data")
    items = read_items(task, data)
    shots = task.few_shot.k if shots is None else shots
    pool = read_items(task, task.few_shot.source) if task.few_shot.source else items
    n = min(len(items), limit or len(items))
    key = hashlib.sha256(json.dumps([to_dict(task), str(Path(data).resolve()), shots, model_id]).encode()).hexdigest()
    samples_rel = f"eval/{task.name}.samples.jsonl"
    run.file("eval").mkdir(exist_ok=True)
    done = read_samples(run.file(samples_rel), key)
    todo = [(i, items[i]) for i in range(n) if i not in done]
    family, truncated = FAMILIES[task.family], backend.truncated
    # items handed over at once: a few batches of choices or sentences, so the backend can sort them by length and
    # shared prefix; perplexity texts and code problems one at a time, so an interrupted run resumes per item
    step = {"perplexity": 1, "code": 1, "generate": batch_size}.get(task.family, 4 * batch_size)
    with EvalProgress(task.name, n, n - len(todo)) as bar, open(run.file(samples_rel), "a") as f:
        for start in range(0, len(todo), step):
            for sample in family(task, backend, todo[start : start + step], pool, shots):
                f.write(json.dumps({"key": key, **sample}) + "\n")
                done[sample["i"]] = sample
            f.flush()
            bar.advance(len(todo[start : start + step]))
    scored = [done[i] for i in range(n) if i in done]
    metrics, stderr = aggregate(task, scored)
    skipped = Counter(s["skipped"] for s in scored if "skipped" in s)
    result = {
        "task": task.name,
        "n": len(scored) - sum(skipped.values()),
        "metrics": metrics,
        "stderr": stderr,
        "samples": samples_rel,
        "skipped": dict(skipped),
        "truncated": backend.truncated - truncated,  # contexts cut on the left in this session, as lm-eval does
        "contaminated": contaminated(source, items[:n]),
        "shots": shots,
        "data": str(data),
    }
    run.write_json(f"eval/{task.name}.json", result)
    return result


def contaminated(source: Path | None, items: list[dict[str, Any]]) -> int | None:
    """Items sharing a word 13-gram with the training data of the run `source`; None for a server or a run without
    training shards (fine-tuning data is not counted)."""
    from lmforge.eval import contamination

    if source is None or not (source / "data/train/manifest.json").is_file():
        return None
    return contamination.count_overlapping([_text(item) for item in items], contamination.training_ngrams(source))


def _text(value: Any) -> str:
    """Every string in an item (question, choices, answer...), a line each, as decontaminate.task_items reads them."""
    if isinstance(value, dict):
        return "\n".join(_text(v) for v in value.values())
    if isinstance(value, list):
        return "\n".join(_text(v) for v in value)
    return value if isinstance(value, str) else ""


def read_samples(path: Path, key: str) -> dict[int, dict]:
    """Samples already scored with the same task, data, shots and model; a file written under another setting starts
    over (a cut last line, from an interrupted write, is skipped)."""
    if not path.exists():
        return {}
    text = path.read_text()
    done, stale = {}, not text.endswith("\n") and bool(text)  # a cut last line: rewrite before appending
    for line in text.splitlines():
        try:
            sample = json.loads(line)
        except json.JSONDecodeError:
            continue
        if sample.pop("key", None) != key:
            stale = True
            continue
        done[sample["i"]] = sample
    if stale:
        path.write_text("".join(json.dumps({"key": key, **s}) + "\n" for s in done.values()))
    return done


def write_summary(run: Run, config: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """eval.json (one row per task ever evaluated in this run, newest results) and eval_config.json for the report."""
    previous = run.read_json("eval.json")["tasks"] if run.file("eval.json").is_file() else []
    rows = {r["task"]: r for r in previous}
    for r in results:
        rows[r["task"]] = {"task": r["task"], "n": r["n"], **r["metrics"]}
    scores = {f"{t} {k}": v for t, r in rows.items() for k, v in r.items() if k.split("/")[0] not in NOT_SHARES}
    run.write_json("eval_config.json", {"run": {"name": run.path.name, "root": str(run.path.parent)}, **config})
    run.write_json("eval.json", {"tasks": list(rows.values()), "scores": scores})


class EvalProgress:
    """A live bar with items/s and the time left, on a terminal only."""

    def __init__(self, name: str, total: int, done: int):
        self.start, self.scored = time.perf_counter(), 0
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} items/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            disable=not Console(file=sys.stderr).is_terminal,
        )
        self.task = self.bar.add_task(name, total=total, completed=done, rate="-")

    def __enter__(self) -> EvalProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def advance(self, n: int) -> None:
        self.scored += n
        rate = self.scored / (time.perf_counter() - self.start)
        self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")
