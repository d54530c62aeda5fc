"""report.md and its plots, rendered from what the stages wrote into the run folder (a view, no logic).

Run: `lmforge report RUN` (stages also call it when they finish). Each stage that wrote its config
`<stage>_config.json` (with its `run` section) and its summary `<stage>.json`, or logged rows to metrics.jsonl, gets a
section: its loss plot, then its summary, rendered as it is nested (a dict of values as a table, a list of records as a
table, prompts and completions as code), so a new stage needs no code here.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any

from lmforge.run import Run, atomic_write, resolve_run

# the pre-training plot keeps the name the README and older runs use
PLOT_NAMES = {"pretrain": "loss_curve.png"}
PERCENT_KEYS = {"mfu"}
# metrics other than losses that get a panel each in a stage's second plot (alignment's rewards, KL, accuracies)
CURVE_WORDS = ("reward", "kl", "accuracy", "acc", "margin", "score")
# summaries in transformers' layout that the tokenizer and exports write into a run folder: not stages
NOT_STAGES = {"tokenizer", "special_tokens_map", "config", "generation_config"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder or name under runs/")


def command(args: argparse.Namespace) -> None:
    print(write_report(resolve_run(args.run)))


def write_report(run_dir: str | Path) -> Path:
    run = Run(run_dir)
    lines = [f"# Run `{run.path.name}`", ""]
    for stage in stages(run):
        lines += _stage_section(run, stage)
    path = run.file("report.md")
    atomic_write(path, "\n".join(lines))
    return path


def stages(run: Run) -> list[str]:
    """The stages of the run in the order they started: each that wrote its config (by the config's time) or only a
    summary (by the summary's time, as pre-training's record of prepared data, data.json), then any other that only
    logged metrics. A stage's config holds its `run` section, which tells it from other files named *_config.json
    (the tokenizer's, in transformers' layout)."""
    started = {}
    for config in run.path.glob("*_config.json"):
        name = config.name.removesuffix("_config.json")
        if _is_stage_config(config) and run.file(f"{name}.json").is_file():
            started[name] = config.stat().st_mtime
    for summary in run.path.glob("*.json"):
        name = summary.stem
        if name not in started and not name.endswith("_config") and name not in NOT_STAGES:
            started[name] = summary.stat().st_mtime
    names = sorted(started, key=started.get)
    for row in run.read_metrics():
        if isinstance(row.get("stage"), str) and row["stage"] not in names:
            names.append(row["stage"])
    return names


def _is_stage_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("run"), dict)


def _stage_section(run: Run, stage: str) -> list[str]:
    lines = [f"## {stage}", ""]
    plot = PLOT_NAMES.get(stage, f"{stage}_loss_curve.png")
    if _loss_plot(run, run.read_metrics(stage), plot):
        lines += [f"![{stage} loss curve]({plot})", ""]
    if _curves_plot(run, run.read_metrics(stage), f"{stage}_curves.png"):
        lines += [f"![{stage} rewards, KL and accuracy]({stage}_curves.png)", ""]
    summary_path = run.file(f"{stage}.json")
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if isinstance(summary, dict) and _bar_plot(run, summary.get("scores"), f"{stage}_scores.png"):
            lines += [f"![{stage} scores]({stage}_scores.png)", ""]
        lines += _render(summary, level=3) if isinstance(summary, dict) else _render({"summary": summary}, level=3)
    return lines


def _render(values: dict[str, Any], level: int) -> list[str]:
    """Scalars (and lists of scalars) as one table, then each nested dict or list of records under its own heading."""
    values = {k: v for k, v in values.items() if v != [] and v != {}}  # nothing to show (no samples asked for)
    scalars = {k: v for k, v in values.items() if not _nested(v)}
    lines = _table(scalars) if scalars else []
    for key, value in values.items():
        if not _nested(value):
            continue
        lines += [f"{'#' * level} {_title(key)}", ""]
        if isinstance(value, dict):
            lines += _render(value, level + 1)
        elif all(isinstance(v, dict) and {"prompt", "completion"} <= v.keys() for v in value):
            lines += _samples(value)
        else:
            lines += _records(value)
    return lines


def _nested(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict | list) for v in value))


def _title(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _table(values: dict[str, Any]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    for key, value in values.items():
        lines.append(f"| {key.replace('_', ' ')} | {_cell(key, value)} |")
    return lines + [""]


def _records(rows: list[Any]) -> list[str]:
    """A list of records as a table with a column per key (the union, in order of first appearance)."""
    rows = [r if isinstance(r, dict) else {"value": r} for r in rows]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(k, r[k]) if k in r else "" for k in keys) + " |")
    return lines + [""]


def _samples(samples: list[dict[str, Any]]) -> list[str]:
    lines = []
    for sample in samples:
        lines += [f"Prompt `{sample['prompt']!r}`:", "", "```", sample["prompt"] + sample["completion"], "```", ""]
    return lines


def _cell(key: str, value: Any) -> str:
    if key in PERCENT_KEYS and isinstance(value, float):
        return f"{value:.1%}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return _fmt(value).replace("|", "\\|").replace("\n", "<br>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1e6:
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _loss_plot(run: Run, rows: list[dict[str, Any]], name: str) -> bool:
    """Every numeric metric whose name ends in `loss` against the step, in one plot."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if k.endswith("loss") and _number(v)))
    curves = {k: [(r["step"], r[k]) for r in rows if _number(r.get(k)) and _number(r.get("step"))] for k in keys}
    curves = {k: points for k, points in curves.items() if points}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, points in curves.items():
        style = "o-" if key.startswith("val") else "-"  # validation points are few and far apart
        ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token for cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(run, fig, name)
    return True


def _curves_plot(run: Run, rows: list[dict[str, Any]], name: str) -> bool:
    """One panel per numeric metric named for a reward, KL, accuracy, margin or score, against the step."""
    keys = [
        k
        for k in dict.fromkeys(k for r in rows for k, v in r.items() if _number(v))
        if not k.endswith("loss") and any(w in k.lower().replace("/", "_").split("_") for w in CURVE_WORDS)
    ]
    curves = {k: [(r["step"], r[k]) for r in rows if _number(r.get(k)) and _number(r.get("step"))] for k in keys}
    curves = {k: points for k, points in curves.items() if points}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(curves))
    nrows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), dpi=100, squeeze=False)
    for ax, (key, points) in zip(axes.flat, curves.items(), strict=False):
        ax.plot(*zip(*points, strict=True), "o-" if len(points) < 20 else "-", markersize=3)
        ax.set_title(key.replace("_", " "), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_visible(False)
    _save(run, fig, name)
    return True


def _bar_plot(run: Run, scores: Any, name: str) -> bool:
    """A summary's `scores` ({label: value in [0, 1]}, such as each task's accuracy) as horizontal bars."""
    if not isinstance(scores, dict) or not scores or not all(_number(v) for v in scores.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.35 * len(scores)), dpi=100)
    ax.barh(list(scores)[::-1], list(scores.values())[::-1])
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, axis="x")
    _save(run, fig, name)
    return True


def _save(run: Run, fig, name: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(run.file(name), buf.getvalue())


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
