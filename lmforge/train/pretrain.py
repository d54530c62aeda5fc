"""Pre-training: corpus -> tokenizer -> token shards -> next-token prediction in one plain loop.

Run: `lmforge pretrain --config configs/pretrain/tiny.yaml [--resume] [key.sub=value ...]`
(or `torchrun --nproc-per-node N -m lmforge pretrain ... [parallel.tp=2 parallel.pp=2 parallel.zero=3]`: data, tensor
and pipeline parallelism, see train/parallel.py). Checkpoints are DCP shards (runs/<name>/dcp/, resumable on another
world size) plus a single-file export (runs/<name>/checkpoints/) for generate, export and serve.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lmforge.checkpoint import latest_checkpoint, load_weights
from lmforge.config import check, to_dict
from lmforge.data.canaries import plant_canaries
from lmforge.data.corpus import DataConfig, load_corpus
from lmforge.data.shards import ShardLoader, eval_batches, read_manifest, shards_ready, write_shards
from lmforge.data.training_data import data_lineage
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, ModelConfig, build_model
from lmforge.run import Run, RunConfig
from lmforge.tokenizer import Tokenizer, TokenizerConfig
from lmforge.train import parallel, pipeline
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.config import TrainConfig
from lmforge.train.energy import EnergyMeter
from lmforge.train.flops import matmul_peak_flops
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import ParallelConfig
from lmforge.train.precision import loss_scaler
from lmforge.train.progress import TrainProgress
from lmforge.train.schedule import build_schedulers
from lmforge.train.steps import AUTOCAST, autocast_for, evaluate, forward_backward, optimizer_step, pick_device


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=lambda: ["import os\n", "def parse_args(", "class Stack:\n"])
    """Prompts whose continuations go into the report."""
    max_new_tokens: int = 64
    temperature: float = 0.8
    """0 is greedy, which loops on small models; sampling (seeded) shows more of what the model learnt."""
    top_p: float = 0.95


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resume: bool = False
    """Continue from the newest checkpoint of run.name (the same as --resume)."""

    def validate(self) -> None:
        check(
            self.tokenizer.kind != "byte" or self.model.vocab_size == 263,
            f"tokenizer.kind=byte has 263 tokens (256 bytes + 7 specials); set model.vocab_size=263, "
            f"not {self.model.vocab_size}",
        )
        pc = self.parallel
        pc.check_model(self.model)
        microbatches = pc.microbatches or self.train.grad_accum
        check(
            pc.pp == 1 or (self.train.batch_size * self.train.grad_accum) % microbatches == 0,
            f"parallel.microbatches={microbatches} must divide train.batch_size * train.grad_accum = "
            f"{self.train.batch_size * self.train.grad_accum} (the rows of one pipeline step)",
        )
        check(
            pc.pp == 1 or not self.train.compile,
            "parallel.pp>1 runs stages eagerly; set train.compile=false",
        )
        check(
            self.parallel.backend != "nccl" or self.train.device != "cpu",
            "parallel.backend=nccl needs CUDA devices; use parallel.backend=gloo (or auto) with train.device=cpu",
        )


def prepare_data(cfg: PretrainConfig, run: Run) -> tuple[Tokenizer, dict[str, Any]]:
    """Train (or reuse) the run's tokenizer and write (or reuse) its train/val token shards; when data.path is a
    `lmforge data prepare` output, take its tokenizer and shards instead and record the data lineage (data.json)."""
    from lmforge.data.training_data import is_prepared, use_prepared

    if cfg.data.path and is_prepared(cfg.data.path):
        if cfg.data.canaries:
            raise LmforgeError(f"data.canaries plants into raw text, but {cfg.data.path} is prepared; set it to 0")
        return use_prepared(cfg.data.path, cfg.model.vocab_size, run)

    def read_corpus() -> tuple[list, list]:
        train, val = load_corpus(cfg.data)
        if cfg.data.canaries:
            train, record = plant_canaries(train, cfg.data.canaries, cfg.data.canary_repeats, cfg.run.seed)
            run.write_json("canaries.json", record)
        return train, val

    tok_path = run.file("tokenizer.json")
    corpus = None
    if tok_path.exists():
        tokenizer = Tokenizer.load(tok_path)
    else:
        corpus = read_corpus()
        tokenizer = Tokenizer.train((d.text for d in corpus[0]), cfg.model.vocab_size, cfg.tokenizer)
        tokenizer.save(run.path)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise LmforgeError(
            f"{tok_path} has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size={tokenizer.vocab_size} or use a new run.name"
        )
    manifests = {}
    for i, split in enumerate(("train", "val")):
        folder = run.file(f"data/{split}")
        if not shards_ready(folder, tokenizer):
            corpus = corpus or read_corpus()
            write_shards(corpus[i], tokenizer, folder)
        manifests[split] = read_manifest(folder)
    return tokenizer, manifests


def main(cfg: PretrainConfig, run: Run) -> dict[str, float]:
    tc, mc = cfg.train, cfg.model
    pc = cfg.parallel
    rank, world_size, device = parallel.init_distributed(pc, pick_device(tc.device))
    mesh = parallel.build_mesh(pc, world_size, device)
    dp_rank, dp_size = parallel.dp_rank_and_size(mesh)
    dp_group = mesh["dp"].get_group() if mesh is not None else None
    # every rank holds only part of the model (rank 0 keeps a whole CPU copy for samples and pipeline validation)
    sharded = world_size > 1 and (pc.zero >= 2 or pc.tp > 1 or pc.pp > 1)
    scaler = loss_scaler(tc, device, world_size)
    ckpt = Checkpointer(run, mc, pc, tc.batch_size * dp_size, dp_size, scaler, tc.keep_last)
    t_data = time.perf_counter()
    if rank == 0:
        run.write_json("pretrain_config.json", to_dict(cfg))
        tokenizer, manifests = prepare_data(cfg, run)
    parallel.barrier()
    if rank != 0:
        tokenizer, manifests = prepare_data(cfg, run)  # rank 0 wrote everything, so this only reads
    data_seconds = time.perf_counter() - t_data
    ckpt.lineage = data_lineage(cfg.data.path, tokenizer, manifests, run)
    if manifests["val"]["total_tokens"] <= mc.max_seq_len:
        raise LmforgeError(
            f"the validation split has {manifests['val']['total_tokens']} tokens, fewer than one window of "
            f"{mc.max_seq_len + 1}; raise data.val_fraction, add data or lower model.max_seq_len"
        )

    tokens_per_step = tc.batch_size * tc.grad_accum * dp_size * mc.max_seq_len
    model = build_model(mc, device=device, seed=cfg.run.seed)
    # the header before sharding, and when sharded a whole CPU copy on rank 0 for samples and pipeline validation
    plain = build_model(mc, device="cpu") if sharded and rank == 0 else model
    if rank == 0:
        _log_header(run, cfg, model, manifests, tokens_per_step)
    if pc.pp > 1:
        model = pipeline.build_stage(model, mesh["pp"])  # this rank's layers; `model` is what it trains from here
    memory: dict[str, int] = {}
    if tc.activation_checkpointing != "none" and rank == 0:
        memory = _activation_memory(cfg, run, device)
    dist_model = parallel.parallelize(model, pc, mesh, mc, tc.activation_checkpointing, tc.ac_every)
    pipe = None
    if pc.pp > 1:
        pipe = pipeline.Pipeline(dist_model, mesh["pp"], device, pc.schedule, pc.microbatches or tc.grad_accum, scaler)
    # after sharding: FSDP and TP replace the parameters with DTensors
    optimizers = parallel.shard_optimizers(build_optimizers(model, tc), pc, mesh)
    schedulers = build_schedulers(optimizers, tc)
    loader = ShardLoader(run.file("data/train"), mc.max_seq_len, tc.batch_size, cfg.run.seed, dp_rank, dp_size)
    step = 0
    if cfg.resume:
        step = ckpt.resume(model, optimizers, schedulers, loader)
    else:
        torch.manual_seed(cfg.run.seed)

    train_model = torch.compile(dist_model) if tc.compile else dist_model
    autocast = autocast_for(device, tc.dtype)
    flops_per_step = mc.flops_per_token() * tokens_per_step
    peak = world_size * matmul_peak_flops(device.type, AUTOCAST[tc.dtype] or torch.float32)
    val_dir = run.file("data/val")
    # the first eval_batches global micro-batches of windows, each dp rank a share: the same set on every layout
    val_set = (val_dir, mc.max_seq_len, tc.batch_size, tc.eval_batches * dp_size, autocast)
    meter = EnergyMeter(device, tc)
    losses: list[float] = []
    val_loss = math.nan
    train_seconds = 0.0
    start_step = step
    with TrainProgress(tc.steps, step, show=rank == 0) as progress:
        while step < tc.steps:
            t0 = time.perf_counter()
            batches = [tuple(t.to(device) for t in loader.next_batch()) for _ in range(tc.grad_accum)]
            loss_sum = forward_backward(train_model, batches, scaler, autocast, sync_model=dist_model, pipe=pipe)
            grad_norm = optimizer_step(model, optimizers, schedulers, scaler, tc.grad_clip, pc, mesh)
            meter.sample()
            if step + 1 == tc.steps:  # with the gradients still held: what ZeRO's stages shard
                memory.update(parallel.rank_bytes(model, optimizers))
            model.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_seconds += dt
            losses.append(parallel.mean_loss(loss_sum, pc).item())
            tok_s = tokens_per_step / dt
            progress.update(step, losses[-1], tok_s)
            if rank == 0 and (step % tc.log_every == 0 or step == tc.steps):
                lr = optimizers[0].param_groups[0]["lr"]
                mfu = flops_per_step / dt / peak
                eta = (tc.steps - step) * train_seconds / (step - start_step)
                row = dict(step=step, loss=losses[-1], lr=lr, tokens_per_s=tok_s, grad_norm=grad_norm.item(), mfu=mfu)
                run.log_metrics({**row, "loss_scale": scaler.get_scale()} if scaler.is_enabled() else row)
                progress.line(
                    f"step {step:>6}/{tc.steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | dt {dt * 1000:.0f} ms | "
                    f"{tok_s:,.0f} tok/s | MFU {mfu:.1%} | ETA {eta:.0f}s"
                )
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                if pipe is None:  # every rank: FSDP gathers in forward
                    val_loss = evaluate(train_model, *val_set, (dp_rank, dp_size), dp_group)
                else:
                    val_loss = _evaluate_gathered(model, plain, rank, val_set, pc, mc, mesh)
                if rank == 0:
                    run.log_metrics(dict(step=step, val_loss=val_loss, val_ppl=math.exp(val_loss)))
                    progress.line(f"step {step:>6} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.steps:
                ckpt.save(step, model, optimizers, schedulers, loader)
    compute = meter.stop((step - start_step) * flops_per_step)  # every rank: the ranks' energy is summed

    summary = {
        "steps": step,
        "tokens_trained": step * tokens_per_step,
        "train_loss": losses[-1] if losses else math.nan,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if not math.isnan(val_loss) else math.nan,
        "data_prep_seconds": data_seconds,
        "train_seconds": train_seconds,
        "tokens_per_s": (step - start_step) * tokens_per_step / train_seconds if train_seconds else math.nan,
        "mfu": (step - start_step) * flops_per_step / train_seconds / peak if train_seconds else math.nan,
        **memory,  # rank 0's bytes of parameters, gradients and optimizer state (and of activations, with AC)
    }
    if rank == 0:
        if sharded:  # the final weights, from the export of the final checkpoint
            load_weights(plain, latest_checkpoint(run.path) / "model.safetensors")
        samples = _samples(plain, tokenizer, cfg.sample)
        _write_summary(run, cfg, plain, manifests, tokenizer, summary, compute, samples)
    run.close()
    parallel.destroy()  # after a barrier, so rank 0 has written pretrain.json before any rank returns
    return summary


def _log_header(run: Run, cfg: PretrainConfig, model: Decoder, manifests, tokens_per_step: int) -> None:
    print(
        f"run {run.path} | model {model.num_params() / 1e6:.2f}M params, {cfg.model.flops_per_token() / 1e6:.1f} "
        f"MFLOP/token | data {manifests['train']['total_tokens']:,} train / {manifests['val']['total_tokens']:,} val "
        f"tokens | {tokens_per_step:,} tokens/step",
        flush=True,
    )


def _activation_memory(cfg: PretrainConfig, run: Run, device: torch.device) -> dict[str, int]:
    """Bytes one micro-batch's forward keeps for backward on a whole-model copy, without and with the run's
    activation checkpointing; the RNG is put back so that training is unchanged."""
    rng = torch.get_rng_state()
    x, y = next(eval_batches(run.file("data/val"), cfg.model.max_seq_len, cfg.train.batch_size, 1))
    x, y = x.to(device), y.to(device)
    copy = build_model(cfg.model, device=device)
    without = parallel.saved_activation_bytes(copy, x, y)
    parallel.checkpoint_blocks(copy, cfg.train.activation_checkpointing, cfg.train.ac_every)
    with_ac = parallel.saved_activation_bytes(copy, x, y)
    torch.set_rng_state(rng)
    return {"activation_bytes_without_ac": without, "activation_bytes": with_ac}


def _evaluate_gathered(model, plain, rank: int, val_set: tuple, pc: ParallelConfig, mc: ModelConfig, mesh) -> float:
    """Validation loss of pipeline stages: rank 0 evaluates the whole validation set on the gathered model (a
    pipeline's buffers are sized for the training micro-batch, and the last eval batch may be smaller)."""
    weights = parallel.full_state_dict(model, pc, mesh, mc)
    out = [math.nan]
    if rank == 0:
        plain.load_state_dict(weights)
        out[0] = evaluate(plain, *val_set)
    dist.broadcast_object_list(out, src=0)
    return out[0]


def _samples(model: Decoder, tokenizer: Tokenizer, cfg: SampleConfig) -> list[dict[str, str]]:
    from lmforge.sampling import generate

    model.eval()
    out = []
    for prompt in cfg.prompts:
        text = "".join(generate(model, tokenizer, prompt, cfg.max_new_tokens, cfg.temperature, top_p=cfg.top_p, seed=0))
        out.append({"prompt": prompt, "completion": text})
    return out


def _write_summary(run, cfg, model, manifests, tokenizer, summary, compute, samples) -> None:
    train_m, val_m = manifests["train"], manifests["val"]
    run.write_json(
        "pretrain.json",
        {
            "corpus": {
                "source": cfg.data.path or "embedded: Python standard library",
                "train_docs": train_m["num_docs"],
                "val_docs": val_m["num_docs"],
                "train_tokens": train_m["total_tokens"],
                "val_tokens": val_m["total_tokens"],
                "vocab_size": tokenizer.vocab_size,
            },
            "model": {
                "preset": cfg.model.preset or "(custom)",
                "params": model.num_params(),
                "non_embedding_params": cfg.model.num_params(embeddings=False),
                "flops_per_token": cfg.model.flops_per_token(),
                "layers": cfg.model.n_layers,
                "dim": cfg.model.dim,
                "heads": f"{cfg.model.n_heads} q / {cfg.model.n_kv_heads} kv",
                "variant": f"{cfg.model.pos}, {cfg.model.norm}, {cfg.model.mlp}",
            },
            "training": {**summary, "total_flops": summary["tokens_trained"] * cfg.model.flops_per_token()},
            "compute": compute,
            "samples": samples,
        },
    )
