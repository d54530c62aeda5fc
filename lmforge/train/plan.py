"""Which parallel layouts (dp x tp x pp x ZeRO stage x activation checkpointing) fit a cluster, and how fast each runs.

Memory per rank: model states by the ZeRO paper (Rajbhandari et al., 2020, section 3 and figure 1), activations by
"Reducing Activation Recomputation in Large Transformer Models" (Korthikanti et al., 2022, section 4). Step time: the
training FLOPs (Kaplan et al., 2020; PaLM appendix B) at an assumed MFU, the pipeline bubble (p-1)/(m+p-1) of GPipe and
1F1B (Narayanan et al., 2021), and ring collectives at stated link bandwidths.

Run: `lmforge plan --model llama-7b --gpus 64 --gpu-mem 80GB [--seq-len 4096] [--global-batch 1024] [--json]`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from lmforge import cli_args
from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.models.config import PRESETS, ModelConfig

Dtype = Literal["bf16", "fp16", "fp32"]
Checkpointing = Literal["none", "selective", "full"]
CHECKPOINTING: tuple[Checkpointing, ...] = ("none", "selective", "full")
GB = 1e9


@dataclass
class Cluster:
    gpus: int
    gpu_mem: float
    """Bytes of memory per GPU."""
    gpus_per_node: int = 8
    peak_flops: float = 989e12
    """Dense 16-bit matmul peak per GPU (H100 SXM); fp32 training wants the fp32/TF32 figure here."""
    mfu: float = 0.4
    """Fraction of the peak the kernels reach on the FLOPs executed (recomputation included)."""
    intra_node_bw: float = 450e9
    """Bytes/s one GPU sends inside a node (NVLink 4: 900 GB/s both ways)."""
    inter_node_bw: float = 50e9
    """Bytes/s one GPU sends to other nodes (one 400 Gb/s NIC per GPU)."""
    usable: float = 0.9
    """Fraction of gpu_mem the estimate may fill; the rest goes to the CUDA context, allocator and comm buffers."""


@dataclass
class Workload:
    seq_len: int
    global_batch: int
    """Sequences per optimizer step."""
    micro_batch: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    dtype: Dtype = "bf16"
    """bf16/fp16: mixed precision with fp32 master weights (K=12); fp32: plain fp32 AdamW (K=8)."""


@dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    zero: int
    checkpointing: Checkpointing


@dataclass
class Estimate:
    layout: Layout
    params: float
    grads: float
    optimizer: float
    activations: float
    """Bytes per rank, for the pipeline stage that needs the most."""
    comm_dp: float
    comm_tp: float
    comm_pp: float
    """Bytes one rank sends per optimizer step."""
    bubble: float
    step_s: float
    tokens_per_s: float
    mfu: float
    """Model FLOPs (no recomputation) over the cluster's peak, bubble and exposed communication included."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def model_state_bytes(n_params: float, dp: int, zero: int, dtype: Dtype = "bf16") -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) bytes per rank; ZeRO paper, section 3 / figure 1.

    Mixed-precision Adam keeps 2Ψ of 16-bit weights, 2Ψ of 16-bit gradients and KΨ with K=12 (fp32 master weights,
    momentum, variance); fp32 AdamW keeps 4Ψ + 4Ψ + 8Ψ. Stage 1 divides the optimizer states by N_d, stage 2 also
    the gradients, stage 3 also the parameters."""
    width, k = (4, 8) if dtype == "fp32" else (2, 12)
    params, grads, optimizer = width * n_params, width * n_params, k * n_params
    return (
        params / dp if zero >= 3 else params,
        grads / dp if zero >= 2 else grads,
        optimizer / dp if zero >= 1 else optimizer,
    )


def activation_bytes_per_layer(
    seq_len: int,
    micro_batch: int,
    dim: int,
    n_heads: int,
    tp: int = 1,
    checkpointing: Checkpointing = "none",
    sequence_parallel: bool = True,
) -> float:
    """16-bit activation bytes one transformer layer stores for backward; Korthikanti et al. (2022), table 2.

    sbh(34 + 5as/h) without parallelism; tensor parallel shards all but 10sbh of it, sequence parallel the rest.
    Selective recomputation drops the attention-core term 5as^2b (as FlashAttention does); full recomputation keeps
    only each layer's input, 2sbh."""
    s, b, h, a, t = seq_len, micro_batch, dim, n_heads, tp
    sbh = s * b * h
    if checkpointing == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    attention_core = 0 if checkpointing == "selective" else 5 * a * s / h
    if sequence_parallel:
        return sbh * (34 + attention_core) / t
    return sbh * (10 + 24 / t + attention_core / t)


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle share of a GPipe / 1F1B step: (p-1)/(m+p-1) (Narayanan et al., 2021, section 2.2)."""
    return (pp - 1) / (micro_batches + pp - 1)


def estimate(cfg: ModelConfig, layout: Layout, work: Workload, cluster: Cluster) -> Estimate:
    """Memory, communication and step time of one layout; sequence parallel is on whenever tp > 1."""
    dp, tp, pp = layout.dp, layout.tp, layout.pp
    width = 4 if work.dtype == "fp32" else 2
    micro_batches = work.global_batch // (dp * work.micro_batch)
    s, b, h, L = work.seq_len, work.micro_batch, cfg.dim, cfg.n_layers

    # parameters: blocks split evenly over stages, the embedding on the first, final norm and head on the last
    outside = dataclasses.replace(cfg, n_layers=0).num_params()
    per_layer = (cfg.num_params() - outside) / L
    embedding = cfg.vocab_size * h + (cfg.max_seq_len * h if cfg.pos == "learned" else 0)
    head = outside - embedding if pp == 1 else outside - embedding + (embedding if cfg.tie_embeddings else 0)
    layer_act = activation_bytes_per_layer(s, b, h, cfg.n_heads, tp, layout.checkpointing) * width / 2
    # 1F1B: the first stage holds min(p, m) micro-batches in flight, the last one plus its logits (4sbh(1+v/h)/t)
    logits = 4 * s * b * h * (1 + cfg.vocab_size / h) / tp
    first = (per_layer * L / pp + embedding + (head if pp == 1 else 0), layer_act * L / pp * min(pp, micro_batches))
    last = (per_layer * L / pp + head, layer_act * L / pp + logits)
    stages = [(first[0], first[1] + (logits if pp == 1 else 0)), last]
    best = None
    for stage_params, acts in stages:
        states = model_state_bytes(stage_params / tp, dp, layout.zero, work.dtype)
        if best is None or sum(states) + acts > sum(best[0]) + best[1]:
            best = (states, acts)
    (params, grads, optimizer), activations = best
    rank_params = max(first[0], last[0]) / tp

    # communication: ring collectives send (n-1)/n of the buffer per reduce-scatter or all-gather, twice that per
    # all-reduce; ZeRO-2/3 reduce-scatter (and ZeRO-3 gathers) every micro-batch, DDP and ZeRO-1 once per step
    ring = (dp - 1) / dp * rank_params * width
    comm_dp = {0: 2 * ring, 1: 2 * ring, 2: micro_batches * ring + ring, 3: 3 * micro_batches * ring}[layout.zero]
    tp_collectives = 4 + (2 if layout.checkpointing == "full" else 0)  # per layer: 2 forward, 2 backward, 2 recompute
    comm_tp = tp_collectives * L / pp * micro_batches * 2 * (tp - 1) / tp * s * b * h * width
    comm_pp = 2 * micro_batches * s * b * h * width / tp if pp > 1 else 0.0

    tokens = work.global_batch * s
    model_flops = cfg.flops_per_token(s) * tokens
    recompute = {"none": 0, "selective": 4 * L * s * h * tokens, "full": model_flops / 3}[layout.checkpointing]
    compute_s = (model_flops + recompute) / (cluster.gpus * cluster.peak_flops * cluster.mfu)
    bubble = bubble_fraction(pp, micro_batches)

    def bandwidth(group_span: int) -> float:  # ranks ordered tp fastest, then dp, then pp (Megatron's order)
        return cluster.intra_node_bw if group_span <= cluster.gpus_per_node else cluster.inter_node_bw

    # data-parallel traffic overlaps compute (DDP buckets, FSDP prefetch); tensor- and pipeline-parallel traffic
    # sits on the critical path
    exposed_dp = max(0.0, comm_dp / bandwidth(tp * dp) - compute_s)
    step_s = compute_s / (1 - bubble) + comm_tp / bandwidth(tp) + comm_pp / bandwidth(tp * dp * pp) + exposed_dp
    return Estimate(
        layout=layout,
        params=params,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        comm_dp=comm_dp,
        comm_tp=comm_tp,
        comm_pp=comm_pp,
        bubble=bubble,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        mfu=model_flops / (step_s * cluster.gpus * cluster.peak_flops),
    )


def layouts(cfg: ModelConfig, work: Workload, cluster: Cluster) -> list[Layout]:
    """Every valid layout: tp divides the query and key/value heads and stays inside a node, pp divides the layers,
    dp x tp x pp is the GPU count and dp x micro_batch divides the global batch."""
    out = []
    for tp in _divisors(cluster.gpus):
        if cfg.n_heads % tp or cfg.n_kv_heads % tp or tp > cluster.gpus_per_node:
            continue
        for pp in _divisors(cluster.gpus // tp):
            dp = cluster.gpus // (tp * pp)
            if cfg.n_layers % pp or work.global_batch % (dp * work.micro_batch):
                continue
            for zero in range(4) if dp > 1 else (0,):  # with one data-parallel rank every stage is stage 0
                out += [Layout(dp, tp, pp, zero, ckpt) for ckpt in CHECKPOINTING]
    return out


def plan(cfg: ModelConfig, work: Workload, cluster: Cluster) -> tuple[list[Estimate], list[Estimate]]:
    """(layouts that fit, fastest first; layouts that do not fit)."""
    estimates = [estimate(cfg, layout, work, cluster) for layout in layouts(cfg, work, cluster)]
    budget = cluster.usable * cluster.gpu_mem
    # equal times (communication hidden under compute) go to the layout that sends less, then needs less memory
    fits = sorted((e for e in estimates if e.total <= budget), key=lambda e: (e.step_s, e.comm_dp + e.comm_tp, e.total))
    return fits, [e for e in estimates if e.total > budget]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_bytes(text: str) -> float:
    """'80GB' (1e9), '80GiB' (2**30), '512MB', '512MiB' or a plain number of GB."""
    units = {"": GB, "gb": GB, "gib": 2**30, "mb": 1e6, "mib": 2**20, "tb": 1e12, "tib": 2**40}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; write it like 80GB or 80GiB")
    return float(match.group(1)) * units[match.group(2).lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=f"a preset: {', '.join(PRESETS)}")
    parser.add_argument("--gpus", type=cli_args.positive_int, required=True, help="GPUs in the cluster")
    parser.add_argument("--gpu-mem", type=parse_bytes, required=True, help="memory per GPU, e.g. 80GB or 80GiB")
    parser.add_argument(
        "--seq-len", type=cli_args.positive_int, help="tokens per sequence (default: the model's max_seq_len)"
    )
    parser.add_argument(
        "--global-batch", type=cli_args.positive_int, default=1024, help="sequences per optimizer step (1024)"
    )
    parser.add_argument(
        "--micro-batch", type=cli_args.positive_int, default=1, help="sequences per forward pass per rank (1)"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="bf16/fp16 mixed, or fp32")
    defaults = Cluster(gpus=1, gpu_mem=0)
    parser.add_argument("--gpus-per-node", type=cli_args.positive_int, default=defaults.gpus_per_node, help="(8)")
    parser.add_argument(
        "--peak-tflops", type=cli_args.positive_float, default=defaults.peak_flops / 1e12, help="per GPU (989, H100)"
    )
    parser.add_argument(
        "--mfu", type=cli_args.probability, default=defaults.mfu, help="assumed fraction of peak reached (0.4)"
    )
    parser.add_argument(
        "--intra-gbps", type=cli_args.positive_float, default=defaults.intra_node_bw / GB, help="GB/s in a node (450)"
    )
    parser.add_argument(
        "--inter-gbps", type=cli_args.positive_float, default=defaults.inter_node_bw / GB, help="GB/s across nodes (50)"
    )
    parser.add_argument(
        "--usable", type=cli_args.probability, default=defaults.usable, help="usable share of GPU memory (0.9)"
    )
    parser.add_argument("--top", type=cli_args.positive_int, default=10, help="rows to print (10)")
    parser.add_argument("--json", action="store_true", help="print every fitting layout as JSON")


def command(args: argparse.Namespace) -> None:
    if args.model not in PRESETS:
        raise LmforgeError(f"--model {args.model!r} is not a preset; choose one of {', '.join(PRESETS)}")
    cfg = from_dict(ModelConfig, {"preset": args.model}, "model.")
    for name in ("gpus", "global_batch", "micro_batch", "gpus_per_node", "top"):
        if getattr(args, name) <= 0:
            raise LmforgeError(f"--{name.replace('_', '-')}={getattr(args, name)} must be positive")
    if not (0 < args.mfu <= 1 and 0 < args.usable <= 1):
        raise LmforgeError("--mfu and --usable must be in (0, 1]")
    work = Workload(args.seq_len or cfg.max_seq_len, args.global_batch, args.micro_batch, args.dtype)
    cluster = Cluster(
        args.gpus,
        args.gpu_mem,
        args.gpus_per_node,
        args.peak_tflops * 1e12,
        args.mfu,
        args.intra_gbps * GB,
        args.inter_gbps * GB,
        args.usable,
    )
    fits, too_big = plan(cfg, work, cluster)
    if not fits:
        smallest = min(too_big, key=lambda e: e.total, default=None)
        need = ""
        if smallest is not None:
            need = f"; the smallest needs {smallest.total / GB:.1f} GB per rank ({_name(smallest.layout)})"
        raise LmforgeError(
            f"no layout of {args.model} fits {args.gpus} x {args.gpu_mem / GB:.0f} GB{need}; add GPUs or memory, "
            "or lower --micro-batch or --seq-len"
        )
    if args.json:
        print(json.dumps(_as_json(args.model, cfg, work, cluster, fits, too_big), indent=2))
        return
    _print_table(args.model, cfg, work, cluster, fits, too_big, args.top)


def _name(layout: Layout) -> str:
    return f"dp={layout.dp} tp={layout.tp} pp={layout.pp} zero={layout.zero} ckpt={layout.checkpointing}"


def _as_json(model, cfg, work, cluster, fits, too_big) -> dict:
    rows = [{**dataclasses.asdict(e), "total": e.total} for e in fits]
    return {
        "model": model,
        "params": cfg.num_params(),
        "workload": dataclasses.asdict(work),
        "cluster": dataclasses.asdict(cluster),
        "excluded": len(too_big),
        "layouts": rows,
    }


def _print_table(model, cfg, work, cluster, fits, too_big, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    tokens = work.global_batch * work.seq_len
    title = (
        f"{model} ({cfg.num_params() / 1e9:.2f}B params) on {cluster.gpus} x {cluster.gpu_mem / GB:.0f} GB, "
        f"{work.global_batch} x {work.seq_len} = {tokens:,} tokens/step, {work.dtype}, MFU {cluster.mfu:.0%} assumed: "
        f"{len(fits)} layouts fit, {len(too_big)} do not"
    )
    table = Table(title=title)
    for col in ("dp", "tp", "pp", "zero", "ckpt", "params", "grads", "optim", "activ", "total GB"):
        table.add_column(col, justify="right")
    for col in ("dp/tp/pp comm GB", "bubble", "step s", "tok/s", "MFU"):
        table.add_column(col, justify="right")
    for e in fits[:top]:
        lay = e.layout
        table.add_row(
            *map(str, (lay.dp, lay.tp, lay.pp, lay.zero)),
            lay.checkpointing,
            *(f"{x / GB:.1f}" for x in (e.params, e.grads, e.optimizer, e.activations, e.total)),
            "/".join(f"{x / GB:.1f}" for x in (e.comm_dp, e.comm_tp, e.comm_pp)),
            f"{e.bubble:.1%}",
            f"{e.step_s:.2f}",
            f"{e.tokens_per_s:,.0f}",
            f"{e.mfu:.1%}" if math.isfinite(e.mfu) else "-",
        )
    Console(width=200).print(table)
