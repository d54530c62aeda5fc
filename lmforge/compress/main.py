"""`lmforge compress BASE method=NAME [options] run.name=OUT`: load the base run, compress it with one method, and
write a run folder (compressed checkpoint, tokenizer, compress.json) that every other stage reads.

    lmforge compress tiny method=int8 run.name=tiny-int8
    lmforge compress tiny method=gptq calibration.path=text.txt quant.group_size=128 run.name=tiny-gptq
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.compress import awq, distill, gptq, lowrank, nf4, prune, rtn, share, sparsegpt, structured, ternary
from lmforge.compress.calibration import calibration_windows
from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.store import save_compressed
from lmforge.config import to_dict
from lmforge.errors import LmforgeError
from lmforge.models import Decoder
from lmforge.run import Run, resolve_run

# A method: (config, the base model, its tokenizer, calibration windows or None, the output run) -> Compressed. It
# checks that it applies before it writes anything.
Method = Callable[[CompressConfig, Decoder, Any, Tensor | None, Run], Compressed]


def _int8(cfg: CompressConfig, model: Decoder, tokenizer, windows, run: Run) -> Compressed:
    q = cfg.quant
    rtn.quantize_rtn(model, 8, q.groups(8), q.symmetric, q.head, q.observer_for("int8"))
    return Compressed(model)


def _int4(cfg: CompressConfig, model: Decoder, tokenizer, windows, run: Run) -> Compressed:
    q = cfg.quant
    rtn.quantize_rtn(model, 4, q.groups(4), q.symmetric, q.head, q.observer_for("int4"))
    return Compressed(model)


METHODS: dict[str, Method] = {
    "int8": _int8,
    "int4": _int4,
    "gptq": gptq.compress,
    "awq": awq.compress,
    "nf4": nf4.compress,
    "magnitude": prune.magnitude,
    "wanda": prune.wanda,
    "sparsegpt": sparsegpt.sparsegpt,
    "structured": structured.structured,
    "ternary": ternary.compress,
    "distill": distill.compress,
    "lowrank": lowrank.compress,
    "share": share.compress,
}


def weights_bytes(run_dir: Path) -> int:
    ckpt = latest_checkpoint(run_dir)
    return (ckpt / "model.safetensors").stat().st_size if ckpt else 0


def main(cfg: CompressConfig, run: Run) -> dict[str, float]:
    if cfg.method not in METHODS:
        raise LmforgeError(f"method={cfg.method} is not built yet; choose one of {', '.join(METHODS)}")
    base = resolve_run(cfg.base, cfg.run.root)
    model, tokenizer = load_run(base)
    if getattr(model, "compression", None):
        raise LmforgeError(f"base {base} is already compressed ({model.compression['method']}); compress its base")
    windows = None
    if cfg.calibration.path:
        seq_len = min(cfg.calibration.seq_len, model.cfg.max_seq_len)
        windows = calibration_windows(tokenizer, cfg.calibration.path, cfg.calibration.samples, seq_len, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    start = time.perf_counter()
    result = METHODS[cfg.method](cfg, model, tokenizer, windows, run)
    seconds = time.perf_counter() - start
    options = {k: v for k, v in to_dict(cfg).items() if k not in ("run", "base", "method")}
    info = {"base": str(base.resolve()), "method": cfg.method, "options": options}
    save_compressed(run.path, result.model.eval(), tokenizer, info, result.steps)
    tokenizer.save(run.path)
    run.write_json("compress_config.json", {**to_dict(cfg), "base": str(base)})
    summary = {
        "method": cfg.method,
        "base": str(base),
        "seconds": round(seconds, 2),
        "size_bytes": weights_bytes(run.path),
        "base_size_bytes": weights_bytes(base),
        "calibration_windows": 0 if windows is None else len(windows),
        **result.summary,
    }
    run.write_json("compress.json", summary)
    print(
        f"{cfg.method}: {summary['base_size_bytes'] / 2**20:.1f} MiB -> {summary['size_bytes'] / 2**20:.1f} MiB "
        f"in {seconds:.1f} s; run {run.path}",
        flush=True,
    )
    return {k: v for k, v in summary.items() if isinstance(v, int | float)}
