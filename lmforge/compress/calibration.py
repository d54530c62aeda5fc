"""Calibration text for the methods that look at activations (GPTQ, AWQ, Wanda, SparseGPT): windows of tokens drawn
from a text file, and the blocks run one after another over them so that each block's linear layers see the inputs
the already-compressed blocks before it produce (GPTQ's sequential order, Frantar et al., 2022)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.errors import LmforgeError
from lmforge.models import Decoder


def calibration_windows(tokenizer, path: str | Path, samples: int, seq_len: int, seed: int = 0) -> Tensor:
    """(N, seq_len) token windows at random offsets of the file's tokens (after a BOS), N <= samples; the whole text
    as one window when it is shorter than seq_len."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LmforgeError(f"calibration.path={path} cannot be read ({e}); give a plain text file") from None
    ids = torch.tensor([tokenizer.bos_id, *tokenizer.encode(text)], dtype=torch.long)
    if len(ids) < 2:
        raise LmforgeError(f"calibration.path={path} holds no text; give a file with some text to calibrate on")
    if len(ids) <= seq_len:
        return ids[None]
    generator = torch.Generator().manual_seed(seed)
    count = min(samples, len(ids) // seq_len)
    starts = torch.randint(0, len(ids) - seq_len + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def batches(windows: Tensor, batch_size: int = 8) -> list[Tensor]:
    return list(windows.split(batch_size))


@torch.no_grad()
def block_inputs(model: Decoder, windows: Tensor, batch_size: int = 8) -> list[Tensor]:
    """The first block's inputs (embeddings with their positions), one (B, T, C) tensor per batch of windows."""
    device = model.lm_head.weight.device if isinstance(model.lm_head, nn.Linear) else model.embed.weight.device
    out = []
    for batch in batches(windows.to(device), batch_size):
        pos = torch.arange(batch.shape[1], device=device)
        out.append(model.positions.embed(model.embed(batch), pos))
    return out


@torch.no_grad()
def run_blocks(model: Decoder, inputs: list[Tensor], visit: Callable[[int, nn.Module, list[Tensor]], None]) -> list:
    """For each block in order: visit(i, block, its inputs) (which may compress the block in place), then the block's
    outputs, computed after the visit, become the next block's inputs. Returns the last block's outputs."""
    xs = inputs
    for i, block in enumerate(model.layers):
        visit(i, block, xs)
        xs = [block(x, model.positions, torch.arange(x.shape[1], device=x.device)) for x in xs]
    return xs


@contextmanager
def capture(block: nn.Module, names: list[str], record: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While inside: every forward pass of the block's named submodules calls record(name, its input as (rows, in))."""
    hooks = [
        block.get_submodule(name).register_forward_hook(
            lambda _m, args, _out, name=name: record(name, args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def hessians(model: Decoder, block: nn.Module, names: list[str], xs: list[Tensor]) -> dict[str, Tensor]:
    """Per named linear of the block: H = (2 / n) sum x x^T over its n input rows (float32, (in, in)), GPTQ's."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str, x: Tensor) -> None:
        x = x.float()
        sums[name] = sums.get(name, 0) + x.T @ x
        counts[name] = counts.get(name, 0) + len(x)

    with capture(block, names, record):
        for x in xs:
            block(x, model.positions, torch.arange(x.shape[1], device=x.device))
    return {name: 2.0 * sums[name] / counts[name] for name in names}


def block_linears(block: nn.Module) -> list[str]:
    """The plain nn.Linear layers of a block, by their names inside it, in forward order."""
    return [name for name, m in block.named_modules() if type(m) is nn.Linear]
