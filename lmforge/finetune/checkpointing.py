"""Checkpoints of a tuned model that a resume continues from: the merged weights as a plain checkpoint (what generate,
serve and export read) or, for a method no plain decoder computes, a `tuning/step_N/` folder; beside either, the
trainable weights, the loop's own state (optimizer, schedule, data position...) and the RNG, in one torch file loaded
with weights_only. Shared by the fine-tuning and alignment loops."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.checkpoint import checkpoint_dirs, read_state, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.finetune.peft_format import save_adapter
from lmforge.finetune.tuned import Tuned
from lmforge.run import Run, atomic_write

STATE_FILE = "finetune_state.pt"


def save_tuning(
    run: Run,
    step: int,
    tuned: Tuned,
    state: dict[str, Any],
    info: dict[str, Any],
    keep_last: int,
    extra_tensors: dict[str, dict[str, Tensor]] | None = None,
) -> Path:
    """Write checkpoint `step`: the merged model (or tuning/step_N when the method does not merge) with `info` in its
    state.json and `extra_tensors` files inside, a LoRA run's peft adapter under adapter/, and STATE_FILE holding the
    trainable weights, `state` (state dicts and tensors only) and the RNG."""
    info = {"step": step, **info}
    if tuned.merges:
        folder = save_checkpoint(run.path, step, tuned.merged(), info, keep_last, extra_tensors)
    else:
        folder = run.file(f"tuning/step_{step:06d}")
        folder.mkdir(parents=True, exist_ok=True)
        for name, tensors in (extra_tensors or {}).items():
            import safetensors.torch

            tmp = folder / f".{name}.tmp"
            safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
            tmp.rename(folder / name)
        atomic_write(folder / "state.json", json.dumps(info, indent=2) + "\n")
        for old in tuning_dirs(run)[:-keep_last]:
            shutil.rmtree(old)
    if tuned.cfg.method == "lora":
        save_adapter(tuned, run.file("adapter"))
    full = {"trainable": tuned.trainable_state(), **state, "rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        full["cuda_rng"] = torch.cuda.get_rng_state_all()
    buf = io.BytesIO()
    torch.save(full, buf)
    atomic_write(folder / STATE_FILE, buf.getvalue())
    return folder


def load_tuning(run: Run, tuned: Tuned, device) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest complete checkpoint's folder, its STATE_FILE (trainable weights loaded into `tuned` and the RNG
    restored; the loop loads the rest) and its state.json."""
    complete = [c for c in checkpoint_dirs(run.path) + tuning_dirs(run) if (c / STATE_FILE).is_file()]
    complete.sort(key=lambda c: c.name)
    if not complete:
        raise LmforgeError(f"--resume given but {run.path} holds no resumable checkpoint; drop --resume")
    ckpt = complete[-1]
    state = torch.load(ckpt / STATE_FILE, map_location=device, weights_only=True)
    missing, unexpected = tuned.load_state_dict(state["trainable"], strict=False)
    trained = set(tuned.trainable_state())
    if unexpected or trained & set(missing) or set(state["trainable"]) != trained:
        raise LmforgeError(f"{ckpt} was trained with another peft method; resume with the same peft settings")
    torch.set_rng_state(state["rng"].cpu())
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    print(f"resumed from {ckpt} at step {read_state(ckpt)['step']}", flush=True)
    return ckpt, state, read_state(ckpt)


def tuning_dirs(run: Run) -> list[Path]:
    root = run.file("tuning")
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
