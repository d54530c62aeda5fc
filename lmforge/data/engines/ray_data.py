"""The Ray engine: shard tasks as the rows of a ray.data dataset, one shard per block, mapped by the same function
the local engine runs. Workers write their spill files under the output folder, which on a cluster must be shared."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from lmforge.errors import LmforgeError

T = TypeVar("T")
R = TypeVar("R")


def run_tasks(fn: Callable[[T], R], tasks: list[T], address: str = "") -> Iterator[R]:
    """fn over every task on Ray: the running instance if this process already joined one, else ray.init(address)
    ("" starts a local instance, shut down afterwards)."""
    try:
        import ray
    except ImportError:
        raise LmforgeError("engine=ray needs Ray Data; `pip install 'ray[data]'` or use engine=local") from None
    if not tasks:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None)
    try:
        ds = ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
        for row in ds.map(lambda row: {"result": fn(row["task"])}).iter_rows():
            yield row["result"]
    finally:
        if started:
            ray.shutdown()
