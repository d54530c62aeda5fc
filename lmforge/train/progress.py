"""The training status: a live progress bar (tokens/s, loss, ETA) on a terminal and one status line per log step."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, description: str = "pretrain", show: bool = True):
        self.console = Console(file=sys.stdout, highlight=False)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tok_s]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not (show and self.console.is_terminal),  # one bar per job: rank 0's
        )
        self.task = self.bar.add_task(description, total=total_steps, completed=start_step, loss="-", tok_s="-")

    def __enter__(self) -> TrainProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        self.bar.update(self.task, completed=step, loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)
