"""The local engine: shard tasks on a pool of worker processes, one shard per process at a time, so memory is
bounded by the shard size times the number of workers."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_tasks(fn: Callable[[T], R], tasks: list[T], workers: int = 0) -> Iterator[R]:
    """fn over every task, results as they finish; workers=0 uses every core, and one worker runs in this process."""
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        yield from map(fn, tasks)
        return
    # Leaving the block (done, an error in a worker, the caller stopping) terminates the workers.
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap_unordered(fn, tasks)
