"""Parallel strategies on 2 CPU ranks (gloo): tokens/s, per-rank peak memory and measured model-state bytes beside
the planner's estimate (train/plan.py), and DDP's scaling efficiency from 1 to 2 processes.

Run: `.venv/bin/python benchmarks/parallel.py [--steps 10]` (about 3 minutes on 2 cores; one thread per rank). Each
strategy is `torchrun --nproc-per-node 2 benchmarks/parallel.py --worker ...` running `lmforge pretrain` in-process,
so every rank can report its own peak RSS (resource.getrusage) and the bytes the loop measures (param/grad/optimizer
bytes after the last backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.config import load_config
from lmforge.models import ModelConfig
from lmforge.run import Run
from lmforge.train import plan, pretrain

SEQ, GLOBAL_BATCH = 128, 16
MODEL = [
    "model.vocab_size=512",
    "model.dim=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.hidden_dim=768",
    f"model.max_seq_len={SEQ}",
    "model.tie_embeddings=false",  # pipeline stages cannot share the embedding with the head
]
COMMON = [*MODEL, "data.max_bytes=1000000", "train.optimizer=adamw", "train.eval_every=0", "train.eval_batches=1"]
COMMON += ["train.log_every=1", "train.warmup_steps=2", "sample.prompts=[]", "train.device=cpu"]
# name: (overrides, (dp, tp, pp, zero), planner's micro-batch); every layout trains on GLOBAL_BATCH sequences per step
STRATEGIES = {
    "ddp": (["train.batch_size=8", "parallel.zero=0"], (2, 1, 1, 0), 8),
    "zero1": (["train.batch_size=8", "parallel.zero=1"], (2, 1, 1, 1), 8),
    "zero2": (["train.batch_size=8", "parallel.zero=2"], (2, 1, 1, 2), 8),
    "zero3": (["train.batch_size=8", "parallel.zero=3"], (2, 1, 1, 3), 8),
    "tp2": (["train.batch_size=16", "parallel.tp=2"], (1, 2, 1, 0), 16),
    "pp2": (["train.batch_size=16", "parallel.pp=2", "parallel.microbatches=4"], (1, 1, 2, 0), 4),
}
MB = 2**20


def worker(out: Path, overrides: list[str]) -> None:
    """One rank: train, then write this rank's summary and peak RSS to out/rank_R.json."""
    cfg = load_config(pretrain.PretrainConfig, None, overrides)
    summary = pretrain.main(cfg, Run.from_config(cfg.run))
    rank = int(os.environ.get("RANK", "0"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    (out / f"rank_{rank}.json").write_text(json.dumps({"summary": summary, "peak_rss": peak}))


def launch(root: Path, name: str, overrides: list[str], nproc: int, steps: int) -> list[dict]:
    run_dir = root / name
    run_dir.mkdir()
    for part in ("tokenizer.json", "data"):  # the prepared data of the first run, reused
        src = root / "prep" / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run_dir / part)
    args = [*COMMON, *overrides, f"train.steps={steps}", f"run.root={root}", f"run.name={name}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += [__file__, "--worker", str(run_dir), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
    return [json.loads((run_dir / f"rank_{r}.json").read_text()) for r in range(nproc)]


def steady_tokens_per_s(run_dir: Path) -> float:
    """Median over the steps after the first (which allocates and warms up)."""
    rows = [r["tokens_per_s"] for r in Run(run_dir).read_metrics() if "tokens_per_s" in r]
    return statistics.median(rows[1:])


def planner(layout: tuple[int, int, int, int], micro_batch: int) -> plan.Estimate:
    cfg = load_config(pretrain.PretrainConfig, None, MODEL).model
    assert isinstance(cfg, ModelConfig)
    work = plan.Workload(SEQ, GLOBAL_BATCH, micro_batch, dtype="fp32")
    return plan.estimate(cfg, plan.Layout(*layout, "none"), work, plan.Cluster(gpus=2, gpu_mem=1e12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(Path(args.worker), rest)
    root = Path(tempfile.mkdtemp(prefix="lmforge-parallel-"))
    try:
        prep = load_config(
            pretrain.PretrainConfig, None, [*COMMON, "train.steps=1", f"run.root={root}", "run.name=prep"]
        )
        pretrain.prepare_data(prep, Run.from_config(prep.run))
        shape = " ".join(MODEL[1:6])
        print(f"{shape}, global batch {GLOBAL_BATCH} x {SEQ}, fp32 AdamW, {args.steps} steps, 2 CPU ranks x 1 thread")
        header = f"{'strategy':<8} {'tok/s':>8} {'peak RSS MB r0/r1':>18} | {'measured MB p/g/o (rank 0)':>27} | "
        print(header + f"{'planner MB p/g/o (+act)':>28}")
        results = {}
        for name, (overrides, layout, micro) in STRATEGIES.items():
            ranks = launch(root, name, overrides, 2, args.steps)
            tps = steady_tokens_per_s(root / name)
            results[name] = tps
            s = ranks[0]["summary"]
            est = planner(layout, micro)
            rss = "/".join(f"{r['peak_rss'] / MB:.0f}" for r in ranks)
            measured = "/".join(f"{s[k] / MB:.1f}" for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
            estimate = "/".join(f"{x / MB:.1f}" for x in (est.params, est.grads, est.optimizer))
            print(f"{name:<8} {tps:>8,.0f} {rss:>18} | {measured:>27} | {estimate:>18} (+{est.activations / MB:.0f})")
        single = launch(root, "ddp_1proc", STRATEGIES["ddp"][0], 1, args.steps)
        tps1 = steady_tokens_per_s(root / "ddp_1proc")
        eff = results["ddp"] / (2 * tps1)
        print(
            f"DDP scaling, batch 8 per rank: 1 process {tps1:,.0f} tok/s (peak RSS "
            f"{single[0]['peak_rss'] / MB:.0f} MB), 2 processes {results['ddp']:,.0f} tok/s: efficiency {eff:.2f} "
            "(target >= 0.8; the 2 cores are shared with other jobs, so this is noisy)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
