"""Single-stream decode speed: lmforge's generate_tokens vs transformers' generate(use_cache=True) on the same weights,
and both against the memory-bandwidth roofline (every weight read once per token).

    .venv/bin/python benchmarks/bench_decode.py              # Llama 8192/384/6 layers, 16 + 256 tokens, ~40 s
    .venv/bin/python benchmarks/bench_decode.py --threads 1  # one thread for every path

All cores by default, as `lmforge generate` and torch use them. When other jobs load the machine, pass --threads 1:
threads that wait on each other at every op lose 2-5x whenever another process holds a core. The numpy steps and their
C kernels (cpu/native.py) use torch.get_num_threads() threads, so --threads sets every path.

The weights are exported into a LlamaForCausalLM and both must produce the same greedy tokens before timing. Ours and
the peer run in alternating rounds so that load from other processes hits both; each reports its best round.
"lmforge" is the default decode path (numpy steps and C kernels after a torch prefill, cpu/decode.py),
"lmforge, torch ops" the same model with backend="torch"; both use the same number of threads as transformers.
The rooflines divide the bandwidth of a 512 MiB array (memory) by the weights read per token. Decode can pass them:
the last-level cache keeps part of the weights from one token to the next (55 MB against 32 MB of L3 on the 2-core
EPYC), and a 55 MB array is read at up to ~56 GB/s when warm, against ~30 from memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.machine import memory_bandwidth_gbs, set_threads  # noqa: E402
from lmforge.interop.hf import to_transformers  # noqa: E402
from lmforge.models import Decoder, ModelConfig, build_model  # noqa: E402
from lmforge.serve.generate import generate_tokens, prepare_for_decode  # noqa: E402


def to_hf_llama(model: Decoder) -> nn.Module:
    """A transformers LlamaForCausalLM holding exactly `model`'s weights, set to always generate the full length."""
    hf = to_transformers(model)
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    return hf


@torch.inference_mode()
def hf_generate(hf: nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True
    )
    return out[0, len(prompt) :].tolist()


def read_bandwidth_gbs(mib: int = 512) -> float:
    """GB/s of summing a large fp32 tensor: a pure read, like streaming the weights through a matrix-vector product."""
    x = torch.empty(mib * 2**20 // 4).normal_()
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: Decoder) -> int:
    """Bytes of weights a decode step reads: everything but the input embedding table (one row of it is read)."""
    embedding = {id(model.embed.weight)} - {id(model.lm_head.weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in embedding)


def best_seconds(runs: dict, rounds: int) -> dict[str, float]:
    """Best time of each run over alternating rounds, so load from other processes hits every one of them."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def add_model_arguments(p: argparse.ArgumentParser, max_seq_len: int = 512) -> None:
    """The benchmark model's shape (a Llama: RoPE, RMSNorm, SwiGLU), shared by the decode and serving benchmarks."""
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--n-kv-heads", type=int, default=6)
    p.add_argument("--hidden-dim", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=max_seq_len)


def model_config(args: argparse.Namespace) -> ModelConfig:
    names = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len")
    return ModelConfig(**{name: getattr(args, name) for name in names})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (best counts)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: all cores)")
    args = p.parse_args()

    threads = set_threads(args.threads or None)
    torch.manual_seed(0)
    cfg = model_config(args)
    model = build_model(cfg, seed=0).eval()
    hf = to_hf_llama(model)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    n = args.new_tokens

    prepared = prepare_for_decode(copy.deepcopy(model))
    runs = {
        "lmforge": lambda: list(generate_tokens(prepared, prompt, n)),
        "lmforge, torch ops": lambda: list(generate_tokens(prepared, prompt, n, backend="torch")),
        "transformers": lambda: hf_generate(hf, prompt, n),
    }
    tokens = {name: run() for name, run in runs.items()}
    for name in runs:
        diff = next(
            (i for i, (a, b) in enumerate(zip(tokens[name], tokens["transformers"], strict=True)) if a != b), None
        )
        print(f"{name}: greedy tokens {'identical to transformers' if diff is None else f'differ at {diff}'}")

    best = best_seconds(runs, args.rounds)

    tok_s = {name: n / seconds for name, seconds in best.items()}
    weight_mb = weight_bytes_per_token(model) / 1e6
    read, copy_ = read_bandwidth_gbs(), memory_bandwidth_gbs()
    print(f"threads {threads}, {model.num_params() / 1e6:.1f}M params, fp32, batch 1, prompt {len(prompt)}, new {n}")
    for name, value in tok_s.items():
        print(f"{name:28s} {value:8.1f} tok/s  {value / tok_s['transformers']:5.2f}x transformers")
    print(f"weights read per token {weight_mb:.1f} MB")
    for label, gbs in (("read (sum)", read), ("copy", copy_)):
        roofline = gbs * 1e3 / weight_mb
        print(
            f"{label:10s} bandwidth {gbs:5.1f} GB/s: roofline {roofline:6.1f} tok/s, lmforge at "
            f"{100 * tok_s['lmforge'] / roofline:5.1f}%"
        )
    if any(tokens[name] != tokens["transformers"] for name in runs):
        sys.exit("greedy tokens differ between lmforge and transformers")


if __name__ == "__main__":
    main()
