"""report.md and its plots, rendered from what the stages wrote into the run folder (a view, no logic).

Run: `lmforge report RUN` (stages also call it when they finish).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path
from typing import Any

from lmforge.run import Run, atomic_write, resolve_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder or name under runs/")


def command(args: argparse.Namespace) -> None:
    print(write_report(resolve_run(args.run)))


def write_report(run_dir: str | Path) -> Path:
    run = Run(run_dir)
    lines = [f"# Run `{run.path.name}`", ""]
    pretrain_rows = run.read_metrics("pretrain")
    if pretrain_rows and _loss_plot(run, pretrain_rows):
        lines += ["![loss curve](loss_curve.png)", ""]
    summary_path = run.file("pretrain.json")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        lines += _table("Corpus", summary["corpus"])
        lines += _table("Model", summary["model"])
        lines += _table("Pre-training", summary["training"])
        lines += ["## Samples", ""]
        for sample in summary.get("samples", []):
            lines += [f"Prompt `{sample['prompt']!r}`:", "", "```", sample["prompt"] + sample["completion"], "```", ""]
    path = run.file("report.md")
    atomic_write(path, "\n".join(lines))
    return path


def _table(title: str, values: dict[str, Any]) -> list[str]:
    lines = [f"## {title}", "", "| | |", "|---|---|"]
    for key, value in values.items():
        shown = f"{value:.1%}" if key == "mfu" and isinstance(value, float) else _fmt(value)
        lines.append(f"| {key.replace('_', ' ')} | {shown} |")
    return lines + [""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1e6:
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _loss_plot(run: Run, rows: list[dict[str, Any]]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(run.file("loss_curve.png"), buf.getvalue())
    return True
