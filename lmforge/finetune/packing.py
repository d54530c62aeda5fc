"""Training rows from examples: several examples packed end to end per row (each attends only to itself through
models/packed.py's PackedRows), or one example per row padded; and a seeded, resumable order over the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.finetune.template import IGNORE

Example = tuple[list[int], list[int]]  # (inputs x, targets y), the same length


def pack(examples: list[Example], seq_len: int, pad_id: int, packing: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(x, y, segments), each (rows, seq_len). With packing, examples fill rows in order (one that does not fit starts
    the next row); without, one example per row. Padding has target -100 and segment -1 (its own example); segments
    number examples from 0 within each row. Every example must be at most seq_len long."""
    rows: list[list[Example]] = []
    used = seq_len + 1
    for ex in examples:
        assert len(ex[0]) <= seq_len, "examples longer than the context are rejected before packing"
        if not packing or used + len(ex[0]) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex[0])
    x = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    segments = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s, (xs, ys) in enumerate(row):
            n = len(xs)
            x[r, at : at + n], y[r, at : at + n], segments[r, at : at + n] = torch.tensor(xs), torch.tensor(ys), s
            at += n
    return x, y, segments


class RowLoader:
    """Batches of rows in a seeded order, reshuffled every epoch; `state_dict` is the position, for an exact resume."""

    def __init__(self, rows: tuple[Tensor, Tensor, Tensor], batch_size: int, seed: int):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.cursor = 0, 0

    def _order(self) -> Tensor:
        return torch.randperm(len(self.rows[0]), generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """(x, y, segments) of batch_size rows, wrapping into the next epoch's order when this one runs out."""
        take, have = [], 0
        while have < self.batch_size:
            order = self._order()
            n = min(self.batch_size - have, len(order) - self.cursor)
            take.append(order[self.cursor : self.cursor + n])
            have += n
            self.cursor += n
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        idx = torch.cat(take)
        return tuple(t[idx] for t in self.rows)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
