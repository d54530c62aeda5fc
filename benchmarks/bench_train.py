"""Training throughput: lmforge's decoder vs transformers' LlamaForCausalLM at the same shapes, batch, optimizer
(fused AdamW) and precision, fp32 and bf16 autocast; prints tok/s, the ratio and MFU against the measured matmul peak.

    .venv/bin/python benchmarks/bench_train.py            # fp32 and bf16, about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_train.py --compile  # also lmforge under torch.compile

A step is forward, backward, gradient clipping, optimizer step and zero_grad. Ours and the peer run in alternating
rounds so that load from other processes on the machine hits both; the table reports the median round.
All cores by default; when other jobs load the machine, pass --threads 1: with three other jobs on this 2-core
machine, two threads made a step ~10x slower (13.6 s vs 1.3 s per profiled fp32 step of 4x256 tokens), since each
op's barrier waits for a descheduled thread. The compiled model's first step is the compile: ~23 s cold, ~4 s once
inductor's cache (under /tmp) holds the graphs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.machine import matmul_peak_gflops, numpy_matmul_gflops, set_threads  # noqa: E402
from lmforge.interop.hf import to_transformers  # noqa: E402
from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.optim import build_optimizers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_llama(cfg: ModelConfig) -> nn.Module:
    """transformers' LlamaForCausalLM with the same shapes and the same initial weights as ours."""
    hf = to_transformers(build_model(cfg, seed=0))
    hf.config.use_cache = False
    return hf


def hf_adamw(model: nn.Module, train: TrainConfig) -> list[torch.optim.Optimizer]:
    """The same AdamW as lmforge's build_optimizers: decay on matrices only, fused."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=True)]


class Runner:
    """One model with its optimizer and a step function; `rounds` collects seconds per timed step."""

    def __init__(self, name: str, model: nn.Module, optimizers: list[torch.optim.Optimizer], loss_fn, dtype: str):
        self.name, self.model, self.optimizers, self.loss_fn = name, model, optimizers, loss_fn
        self.autocast = dtype == "bf16"
        self.rounds: list[float] = []
        self.first_step_s = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor, clip: float) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, x: torch.Tensor, y: torch.Tensor, steps: int, clip: float) -> None:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(x, y, clip)
        self.rounds.append((time.perf_counter() - t0) / steps)


def ours_loss(model, x, y):
    return model(x, y)


def hf_loss(model, x, y):
    # HF shifts labels inside the loss, so pass the inputs themselves: the same next-token task on T-1 positions
    return model(input_ids=x, labels=x).loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per model")
    p.add_argument("--steps", type=int, default=2, help="steps per round")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    args = p.parse_args()

    threads = set_threads(args.threads or None)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.heads,
        hidden_dim=args.hidden,
        max_seq_len=args.seq,
        rope_theta=10000.0,
        tie_embeddings=False,
    )
    cfg.validate()
    train = TrainConfig(optimizer="adamw", lr=3e-4)
    flops = cfg.flops_per_token(args.seq)
    tokens = args.batch * args.seq
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.roll(x, -1, dims=1)
    print(
        f"torch {torch.__version__}, {threads} threads | dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}, seq {args.seq}, batch {args.batch} | "
        f"{cfg.num_params() / 1e6:.1f}M params, {flops / 1e6:.1f} MFLOP/token"
    )

    rows = []
    for dtype in args.dtypes.split(","):
        peak = matmul_peak_gflops(DTYPES[dtype]) * 1e9
        torch.manual_seed(0)
        ours = build_model(cfg, seed=0).train()
        runners = [Runner("lmforge", ours, build_optimizers(ours, train), ours_loss, dtype)]
        hf = hf_llama(cfg).train()
        runners.append(Runner("hf llama", hf, hf_adamw(hf, train), hf_loss, dtype))
        if args.compile:
            compiled = build_model(cfg, seed=0).train()
            runner = Runner(
                "lmforge compiled", torch.compile(compiled), build_optimizers(compiled, train), ours_loss, dtype
            )
            runners.append(runner)
        for r in runners:
            t0 = time.perf_counter()
            r.step(x, y, train.grad_clip)
            r.first_step_s = time.perf_counter() - t0  # includes compilation for the compiled model
            for _ in range(args.warmup - 1):
                r.step(x, y, train.grad_clip)
        for _ in range(args.rounds):
            for r in runners:
                r.run(x, y, args.steps, train.grad_clip)
        for r in runners:
            tok_s = tokens / statistics.median(r.rounds)
            rows.append((dtype, r.name, tok_s, tok_s * flops / peak, peak / 1e9, r.first_step_s))
        del runners, ours, hf

    print(f"\n{'dtype':5} {'model':17} {'tok/s':>8} {'vs hf':>6} {'MFU':>6} {'peak GF/s':>9} {'1st step s':>10}")
    for dtype, name, tok_s, mfu, peak_g, first in rows:
        hf_tok_s = next(t for d, n, t, *_ in rows if d == dtype and n == "hf llama")
        print(f"{dtype:5} {name:17} {tok_s:8.0f} {tok_s / hf_tok_s:5.2f}x {mfu:6.1%} {peak_g:9.0f} {first:10.1f}")
    # the ceiling: no model code can run its matmuls faster than the machine's best matmul kernel
    numpy_peak = numpy_matmul_gflops()
    for dtype, name, tok_s, mfu, peak_g, _ in rows:
        if name == "hf llama":
            print(
                f"{dtype}: 1.5x transformers would be {1.5 * tok_s:.0f} tok/s, {1.5 * mfu:.0%} of the measured {dtype} "
                f"matmul peak ({peak_g:.0f} GFLOP/s; numpy's fp32 BLAS: {numpy_peak:.0f})"
            )


if __name__ == "__main__":
    main()
