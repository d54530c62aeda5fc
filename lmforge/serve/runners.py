"""What executes an engine step: a runner takes the step's packed chunks and returns their logits. The torch runner
takes any model torch can run (a GPU, bf16, a streamed or adapted model); the CPU runner (lmforge/cpu) takes the
models its allowlist admits. `make_runner` picks one, once, when the engine starts."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from lmforge.cpu.allowlist import unsupported_reason
from lmforge.cpu.runner import CpuRunner
from lmforge.errors import LmforgeError
from lmforge.models import Decoder
from lmforge.serve.adapters import AdapterSet
from lmforge.serve.paged import Chunk, PagedBatch, PagedKVStore

BACKENDS = ("auto", "torch")


class Runner(Protocol):
    def run(self, chunks: list[Chunk], all_rows: list[bool]) -> list[Tensor]:
        """One packed forward pass writing the chunks' keys and values to the store; per chunk the float logits of
        every row (all_rows) or of its last row, (R, V)."""
        ...


class TorchRunner:
    """The model's own forward pass over the packed chunks (paged.PagedBatch as its cache)."""

    def __init__(self, model: Decoder, store: PagedKVStore, adapters: AdapterSet | None = None):
        self.model, self.store, self.device = model, store, model.lm_head.weight.device
        self.adapters = adapters

    def run(self, chunks: list[Chunk], all_rows: list[bool]) -> list[Tensor]:
        model = self.model
        if self.adapters is not None:  # every adapted linear reads which rows take which adapter from here
            self.adapters.step.set([c.adapter for c in chunks for _ in c.tokens], self.device)
        batch = PagedBatch(self.store, chunks, self.device)
        hidden = model.hidden_states(batch.ids, batch)[0]  # (N, C)
        rows, row = [], 0
        for chunk, every in zip(chunks, all_rows, strict=True):
            n = len(chunk.tokens)
            rows.append(range(row, row + n) if every else range(row + n - 1, row + n))
            row += n
        picked = torch.tensor([r for rs in rows for r in rs], device=self.device)
        logits = model.lm_head(model.norm(hidden[picked])).float()  # (R, V)
        return list(logits.split([len(rs) for rs in rows]))


def make_runner(
    model: Decoder, store: PagedKVStore, backend: str = "auto", adapters: AdapterSet | None = None
) -> Runner:
    """backend "auto": the CPU runner where its allowlist admits the model and the store is on the CPU, else torch;
    "torch": the torch runner always. A model with served adapters is no longer on the allowlist: torch runs it."""
    if backend not in BACKENDS:
        raise LmforgeError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    torch_runner = TorchRunner(model, store, adapters)
    if backend == "auto" and store.k.device.type == "cpu" and unsupported_reason(model) is None:
        return CpuRunner(model, store, fallback=torch_runner)
    return torch_runner
