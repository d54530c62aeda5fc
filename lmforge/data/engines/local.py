"""The local engine: shard tasks on a pool of worker processes, one shard per process at a time, so memory is
bounded by the shard size times the number of workers."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
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
    with multiprocessing.get_context().Pool(workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.imap_unordered(fn, tasks)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the parent dies. A parent killed by SIGKILL cannot terminate its pool, and
    an orphaned worker would go on writing its shard into the work folder while a rerun writes the same shard."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)
