"""The run folder `runs/<name>/` that every stage reads and writes: atomic files, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import check
from lmforge.errors import LmforgeError


@dataclass
class RunConfig:
    name: str = "tiny"
    """Run folder name: everything lands in `<root>/<name>/`."""
    root: str = "runs"
    """Folder that holds the run folders."""
    seed: int = 1337
    """Seed for model init, data order and sampling."""

    def validate(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"run.name={self.name!r} must be a non-empty folder name")


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_run(name_or_path: str | Path, root: str | Path = "runs") -> Path:
    """A run given as a folder path or as a name under `root`; it must exist."""
    for candidate in (Path(name_or_path), Path(root) / str(name_or_path)):
        if candidate.is_dir():
            return candidate
    raise LmforgeError(
        f"run {name_or_path!r} not found (looked for the folder itself and {root}/{name_or_path}); "
        "train one first with `lmforge pretrain` or `lmforge speedrun`"
    )


class Run:
    """One run folder. Stages write artifacts through it; `report.py` turns them into report.md."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._tb = None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Run:
        return cls(Path(cfg.root) / cfg.name)

    def file(self, rel: str) -> Path:
        return self.path / rel

    def write_text(self, rel: str, text: str) -> Path:
        atomic_write(self.path / rel, text)
        return self.path / rel

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2) + "\n")

    def read_json(self, rel: str) -> Any:
        path = self.path / rel
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise LmforgeError(f"{path} is missing; the stage that writes it has not run in this run folder") from None
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} is not valid JSON ({e}); delete it and rerun the stage") from None

    def log_metrics(self, row: dict[str, Any], stage: str = "pretrain") -> None:
        """Append one JSON line to metrics.jsonl (a crash can cut only the last line, which readers skip)
        and mirror the numbers to TensorBoard."""
        row = {"stage": stage, **row}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("step")
        if step is not None:
            writer = self.tensorboard()
            for key, value in row.items():
                if key not in ("step", "stage") and isinstance(value, int | float):
                    writer.add_scalar(f"{stage}/{key}", value, step)

    def read_metrics(self, stage: str | None = None) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if stage is None or row.get("stage") == stage:
                rows.append(row)
        return rows

    def tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        return self._tb

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
