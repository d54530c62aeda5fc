"""Checkpoints: weights in safetensors with the model config as JSON beside them, written to a temp folder and
renamed into place. What generate, export and serve read; training resumes from its DCP checkpoints (train/dcp.py).

Layout: runs/<name>/checkpoints/step_000100/{model.safetensors, model.json, state.json}
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from lmforge.config import from_dict, to_dict
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, ModelConfig, build_model
from lmforge.run import atomic_write


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp folders of interrupted writes are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Decoder,
    state: dict[str, Any],
    keep_last: int = 2,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    extra_json: dict[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write checkpoint `step` atomically (temp folder + rename) and delete all but the newest `keep_last`;
    extra_tensors: more safetensors files by name (a reward model's head) written inside before the rename;
    extra_json: more JSON files by name, each made from the temp folder once the weights are in it."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    atomic_write(tmp / "model.json", json.dumps(to_dict(model.cfg), indent=2) + "\n")
    atomic_write(tmp / "state.json", json.dumps({"step": step, **state}, indent=2) + "\n")
    for name, tensors in (extra_tensors or {}).items():
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
    for name, describe in (extra_json or {}).items():
        atomic_write(tmp / name, json.dumps(describe(tmp), indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def _find(run_or_ckpt: str | Path) -> Path:
    path = Path(run_or_ckpt)
    if (path / "model.safetensors").exists():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise LmforgeError(f"no checkpoint in {path}/checkpoints; train the run first (lmforge pretrain)")
    return ckpt


def read_model_config(ckpt: str | Path) -> ModelConfig:
    path = _find(ckpt) / "model.json"
    try:
        return from_dict(ModelConfig, json.loads(path.read_text()), "model.")
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path} is missing or corrupt ({e}); use an intact checkpoint") from None


def load_model(run_or_ckpt: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """The model of a checkpoint folder, or of the newest checkpoint of a run folder."""
    ckpt = _find(run_or_ckpt)
    cfg = read_model_config(ckpt)
    if (ckpt / "compression.json").exists():
        from lmforge.compress.store import load_compressed

        return load_compressed(ckpt, cfg, device)
    check_config_fits(cfg, read_shapes(ckpt / "model.safetensors"), ckpt / "model.json")
    model = build_model(cfg, device=device)
    load_weights(model, ckpt / "model.safetensors")
    return model


def load_weights(model: Decoder, path: Path) -> None:
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=str(_device(model)))
    except (safetensors.SafetensorError, OSError, RuntimeError) as e:
        raise LmforgeError(
            f"checkpoint {path} is truncated or corrupt ({e}); delete its folder and use an earlier checkpoint"
        ) from None
    if missing or unexpected:
        raise LmforgeError(
            f"checkpoint {path} does not fit its model.json (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); use a checkpoint written by this version of lmforge"
        )


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header alone (nothing the config sizes is allocated)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (safetensors.SafetensorError, OSError) as e:
        raise LmforgeError(
            f"checkpoint {path} is truncated or corrupt ({e}); delete its folder and use an earlier checkpoint"
        ) from None


def check_config_fits(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], where: str | Path) -> None:
    """Refuse a model config that does not describe the tensors saved with it (`shapes`, by our state-dict names),
    before anything is allocated: a tampered model.json (n_layers=10**9) would otherwise build for minutes.

    The layer count and the embedding are compared first, on the names alone; then the config is built on the meta
    device (no memory) and every parameter's shape compared; last, the tables the config sizes that no tensor holds
    (RoPE's cos/sin, max_seq_len x head_dim) must not outgrow the weights."""
    unfit = f"{where} does not fit its weights"
    fix = "use the model.json saved with these weights"
    saved = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.") and k.split(".")[1].isdigit()}
    if len(saved) != cfg.n_layers or max(saved, default=-1) != cfg.n_layers - 1:  # not range(n_layers): it may be 1e9
        raise LmforgeError(f"{unfit}: it says n_layers={cfg.n_layers}, they hold {len(saved)} layers; {fix}")
    embed = (cfg.vocab_size, cfg.dim)
    if shapes.get("embed.weight", embed) != embed:
        have = list(shapes["embed.weight"])
        raise LmforgeError(f"{unfit}: it makes embed.weight {list(embed)}, they hold {have}; {fix}")
    try:
        with torch.device("meta"):
            model = Decoder(cfg)
    except (RuntimeError, OverflowError) as e:  # sizes past what a tensor can index
        raise LmforgeError(f"{unfit}: it describes tensors too large to exist ({e}); {fix}") from None
    names: dict[int, list[str]] = {}  # a tied parameter has several names and is saved under one of them
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    wanted = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    for aliases in names.values():
        present = [n for n in aliases if n in shapes]
        if not present:
            raise LmforgeError(f"{unfit}: it needs a tensor {aliases[0]} that they lack; {fix}")
        for n in present:
            if shapes[n] != wanted[n]:
                raise LmforgeError(f"{unfit}: it makes {n} {list(wanted[n])}, they hold {list(shapes[n])}; {fix}")
    extra = sorted(set(shapes) - set(wanted))
    if extra:
        raise LmforgeError(f"{unfit}: they hold tensors it has no place for ({', '.join(extra[:3])}); {fix}")
    weights = sum(math.prod(s) for s in shapes.values())
    in_state = sum(math.prod(wanted[n]) for n, _ in model.named_buffers() if n in wanted)
    tables = sum(b.numel() for b in model.buffers()) - in_state
    if tables > max(weights, 2**28):
        raise LmforgeError(
            f"{unfit}: its max_seq_len={cfg.max_seq_len} needs {tables:,} numbers of position tables for "
            f"{weights:,} weights; set max_seq_len to the context the model was trained with"
        )


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{ckpt}/state.json is missing or corrupt ({e}); resume from another checkpoint") from None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_run(run: str | Path, device: str | torch.device = "cpu", dense: bool = False):
    """The newest model of a run and its tokenizer, checked to share one vocabulary. dense: a compressed model's
    quantized or factorised layers become plain nn.Linear holding their dequantized weights (for training, export)."""
    from lmforge.run import resolve_run
    from lmforge.tokenizer import Tokenizer

    run_dir = resolve_run(run)
    model = load_model(run_dir, device)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise LmforgeError(
            f"the checkpoint's vocabulary ({model.cfg.vocab_size}) does not match {run_dir}/tokenizer.json "
            f"({tokenizer.vocab_size}); use the tokenizer the model was trained with"
        )
    if (_find(run_dir) / "compression.json").exists():
        from lmforge.compress.store import check_tokenizer

        check_tokenizer(_find(run_dir), run_dir / "tokenizer.json")
        if dense:
            from lmforge.compress.modules import densify

            densify(model)
    return model.eval(), tokenizer
