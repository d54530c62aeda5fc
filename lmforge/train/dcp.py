"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards of the model and
optimizer state, and any number of ranks, sharded any way (one process, DDP, FSDP2), reads them back (resharding on
load); plus export to the single-file model.safetensors + model.json that the rest of lmforge reads.

Layout: runs/<name>/dcp/step_000100/{__0_0.distcp, __1_0.distcp, .metadata, model.json, state.json, trainer.pt}
`trainer.pt` holds the schedulers and rank 0's RNG (loaded with weights_only=True), `state.json` the step, the world
size and whatever the loop adds. A save goes to `.step_N.tmp` and is renamed by rank 0 after every rank finished, so
an interrupted save leaves the previous checkpoint the newest complete one. Tensor parallelism trains fused q|k|v and
gate|up rows interleaved by rank (train/tensor_parallel.py); `rows` puts them back in the model's own order on save
(and interleaves them again on load), so a checkpoint reads the same at any tp.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.lr_scheduler import LRScheduler

from lmforge.checkpoint import check_config_fits, read_state
from lmforge.config import from_dict, to_dict
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, ModelConfig, build_model
from lmforge.run import atomic_write
from lmforge.train.safe_dcp import SafePlanner, SafeReader, read_metadata
from lmforge.train.tensor_parallel import deinterleave, interleave

# optimizer state and hyperparameters keyed per parameter ("state.<name>.exp_avg", "param_groups.<name>.lr"): each rank
# writes only the parameters it steps (ZeRO-1's share, a pipeline stage's layers), and any layout reads its own
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
Rows = tuple[dict[str, list[int]], int]
"""Tensor parallelism's fused row blocks by parameter-name suffix (tensor_parallel.fused_rows) and its tp."""


def dcp_dirs(run_dir: str | Path) -> list[Path]:
    """Complete DCP checkpoints of a run, oldest first (temp folders of interrupted saves are ignored)."""
    root = Path(run_dir) / "dcp"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def latest_dcp(run_dir: str | Path) -> Path | None:
    dirs = dcp_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_dcp(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[LRScheduler] = (),
    state: dict[str, Any] | None = None,
    keep_last: int = 2,
    rows: Rows | None = None,
) -> Path:
    """Write checkpoint `step` of `model` (plain, DDP, FSDP2, tensor parallel or a pipeline stage) and its
    optimizers; every rank calls this.

    `state` (JSON-serialisable, e.g. the loader position) lands in state.json beside the step and world size."""
    root = Path(run_dir) / "dcp"
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    rank, world_size = _rank_and_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what an earlier, interrupted save of this step left
        tmp.mkdir(parents=True)
    _barrier()
    # returns once every rank's shards and the .metadata index are written
    state_dict = _reorder(_state_dict(model, optimizers), rows, deinterleave)
    with _one_process_quiet():
        dcp.save(state_dict, checkpoint_id=tmp, no_dist=world_size == 1)
    if rank == 0:
        atomic_write(tmp / "model.json", json.dumps(to_dict(_decoder(model).cfg), indent=2) + "\n")
        atomic_write(tmp / "state.json", json.dumps({"step": step, "world_size": world_size, **(state or {})}) + "\n")
        trainer = {
            "schedulers": [sched.state_dict() for sched in schedulers],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(trainer, tmp / "trainer.pt")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in dcp_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()  # no rank goes on (or loads) before the rename
    return final


def load_dcp(
    ckpt: str | Path,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    schedulers: Sequence[LRScheduler] = (),
    rows: Rows | None = None,
) -> dict[str, Any]:
    """Load a DCP checkpoint into `model` and `optimizers` however they are sharded now, restore the schedulers and
    RNG, and return state.json; every rank calls this."""
    ckpt = Path(ckpt)
    _check_shapes(ckpt, model, with_optimizer=bool(optimizers))
    state_dict = _reorder(_state_dict(model, optimizers), rows, deinterleave)
    # each rank reads the slices of the saved tensors that its own shards cover, into state_dict's tensors in place
    _load(state_dict, ckpt, no_dist=not dist.is_initialized())
    state_dict = _reorder(state_dict, rows, interleave)
    # a pipeline stage loads its own slice of the model
    options = StateDictOptions(strict=not hasattr(model, "own_state_dict"), flatten_optimizer_state_dict=True)
    if optimizers:
        model_sd, optim_sd = state_dict["model"], state_dict["optim"]
        set_state_dict(model, optimizers, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    else:
        set_model_state_dict(model, state_dict["model"], options=options)
    trainer = _read_trainer(ckpt)
    if schedulers and len(trainer["schedulers"]) != len(schedulers):
        raise LmforgeError(
            f"{ckpt} holds {len(trainer['schedulers'])} schedulers, not {len(schedulers)}; resume with the same config"
        )
    for sched, sd in zip(schedulers, trainer["schedulers"], strict=False):
        sched.load_state_dict(sd)
    torch.set_rng_state(trainer["torch_rng"])
    if trainer["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return read_state(ckpt)


def export_safetensors(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Gather a DCP checkpoint's weights into `out_dir`/{model.safetensors, model.json} (what `load_model` reads);
    one process, any number of ranks may have written it."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    cfg = read_dcp_config(ckpt)
    saved = read_metadata(ckpt / ".metadata").state_dict_metadata
    shapes = {k[6:]: tuple(v.size) for k, v in saved.items() if k.startswith("model.") and hasattr(v, "size")}
    check_config_fits(cfg, shapes, ckpt / "model.json")  # before build_model allocates what model.json says
    model = build_model(cfg)
    _check_shapes(ckpt, model, with_optimizer=False)
    state_dict = {"model": model.state_dict()}
    _load(state_dict, ckpt, no_dist=True)  # no collectives: only this process reads
    model.load_state_dict(state_dict["model"])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    atomic_write(tmp / "model.json", json.dumps(to_dict(model.cfg), indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_dcp_config(ckpt: Path) -> ModelConfig:
    try:
        return from_dict(ModelConfig, json.loads((ckpt / "model.json").read_text()), "model.")
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{ckpt}/model.json is missing or corrupt ({e}); use a complete DCP checkpoint") from None


def _state_dict(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """Keys are parameter names (no DDP `module.` prefix) and tensors stay sharded as the model is, which is what lets
    DCP reshard: each rank reads the slices its own shards cover."""
    if not optimizers:
        return {"model": _own(model, get_model_state_dict(model))}
    model_sd, optim_sd = get_state_dict(model, list(optimizers), options=FLAT)
    return {"model": _own(model, model_sd), "optim": optim_sd}


def _own(model: nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """A pipeline stage's state dict without the frozen copies it holds of other stages' parameters (which DCP would
    otherwise dedupe against the trained originals)."""
    return model.own_state_dict(sd) if hasattr(model, "own_state_dict") else sd


def _reorder(sd: dict[str, Any], rows: Rows | None, fn: Callable) -> dict[str, Any]:
    """`sd` with the fused rows of parameters and of their optimizer states (same shape) passed through `fn`
    (interleave or deinterleave). A DTensor is gathered, reordered and re-split with its own placements: one fused
    matrix at a time, so the transient is one layer's projection."""
    if rows is None or rows[1] == 1:
        return sd
    blocks, tp = rows

    def apply(name: str, t: Any) -> Any:
        sizes = next((s for suffix, s in blocks.items() if name.endswith(suffix)), None)
        if sizes is None or not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != sum(sizes):
            return t
        if isinstance(t, DTensor):
            # src_data_rank=None: every rank holds the whole tensor, so each slices its own shard without sending
            return distribute_tensor(fn(t.full_tensor(), sizes, tp), t.device_mesh, t.placements, src_data_rank=None)
        return fn(t, sizes, tp)

    out = {**sd, "model": {k: apply(k, v) for k, v in sd["model"].items()}}
    if "optim" in sd:  # "state.<parameter name>.<moment>": the moments have the parameter's shape
        out["optim"] = {k: apply(k.rsplit(".", 1)[0], v) for k, v in sd["optim"].items()}
    return out


def _load(state_dict: dict[str, Any], ckpt: Path, no_dist: bool) -> None:
    """dcp.load through the reader and planner that unpickle nothing but plain data (train/safe_dcp.py)."""
    try:
        with _one_process_quiet():
            dcp.load(state_dict, storage_reader=SafeReader(ckpt), planner=SafePlanner(), no_dist=no_dist)
    except CheckpointException as e:
        # DCP wraps each rank's exception; ours (a refused pickle) name the file, anything else is a damaged file
        errors = [exc for exc, _ in e.failures.values()]
        ours = next((exc for exc in errors if isinstance(exc, LmforgeError)), None)
        if ours is not None:
            raise LmforgeError(str(ours)) from None
        first = f"{type(errors[0]).__name__}: {errors[0]}".splitlines()[0] if errors else "no detail"
        raise LmforgeError(f"{ckpt} is damaged ({first}); delete it and resume from an earlier checkpoint") from None


def _check_shapes(ckpt: Path, model: nn.Module, with_optimizer: bool) -> None:
    """One clear error for a checkpoint of another model, before DCP's per-tensor failures on every rank."""
    saved = read_metadata(ckpt / ".metadata").state_dict_metadata
    wanted = {f"model.{k}": tuple(v.shape) for k, v in _own(model, get_model_state_dict(model)).items()}
    have = {k: tuple(v.size) for k, v in saved.items() if k.startswith("model.") and hasattr(v, "size")}
    wrong = [k for k in wanted if have.get(k) != wanted[k]]
    if not hasattr(model, "own_state_dict"):  # a pipeline stage holds only some of the model
        wrong += [k for k in have if k not in wanted]
    if wrong:
        key = wrong[0]
        there = f"{list(have[key])} there" if key in have else "missing there"
        here = f"{list(wanted[key])} here" if key in wanted else "absent here"
        saved_cfg = json.loads((ckpt / "model.json").read_text()) if (ckpt / "model.json").exists() else {}
        shape = ", ".join(f"{k}={saved_cfg[k]}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if k in saved_cfg)
        raise LmforgeError(
            f"{ckpt} holds another model shape ({shape}): {key} is {there}, {here} ({len(wrong)} tensors differ); "
            "build the model from the checkpoint's model.json"
        )
    if with_optimizer and not any(k.startswith("optim.") for k in saved):
        raise LmforgeError(f"{ckpt} holds no optimizer state; load it without optimizers or resume from another")


def _read_trainer(ckpt: Path) -> dict[str, Any]:
    try:
        trainer = torch.load(ckpt / "trainer.pt", weights_only=True)  # refuses any pickle that is not plain data
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmforgeError(
            f"{ckpt}/trainer.pt is missing or corrupt ({first}); resume from another checkpoint"
        ) from None
    kinds = {"schedulers": list, "torch_rng": torch.Tensor, "cuda_rng": list}
    if not isinstance(trainer, dict) or not all(isinstance(trainer.get(k), t) for k, t in kinds.items()):
        raise LmforgeError(f"{ckpt}/trainer.pt is not what lmforge writes there; resume from another checkpoint")
    return trainer


def _decoder(model: nn.Module) -> Decoder:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns on every save and load without a process group that it assumes one process, which is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
