"""Single-stream greedy decode: lmforge's generate_tokens vs llama.cpp (llama-cpp-python) on a GGUF export of the same
weights, both fp32 (weights and KV cache) on the same number of threads.

    .venv/bin/python benchmarks/bench_llamacpp.py              # bench_decode.py's Llama 8192/384/6 layers, 16 + 256
    .venv/bin/python benchmarks/bench_llamacpp.py --threads 1  # one thread for both (default: all cores)

Needs llama-cpp-python (`pip install llama-cpp-python` builds llama.cpp from source). The GGUF file is written by
`lmforge export gguf`'s writer, so equal greedy tokens also check that export end to end. Ours and the peer run in
alternating rounds so that load from other processes hits both; each reports its best round. lmforge runs its default
decode path: a torch prefill, then numpy steps with their C kernels (cpu/decode.py, native.py) on torch's threads.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.bench_decode import add_model_arguments, best_seconds, model_config  # noqa: E402
from benchmarks.machine import set_threads  # noqa: E402
from lmforge.interop.gguf import write_gguf  # noqa: E402
from lmforge.models import build_model  # noqa: E402
from lmforge.serve.generate import generate_tokens, prepare_for_decode  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402


def stdlib_tokenizer(vocab_size: int) -> Tokenizer:
    """A BPE tokenizer of exactly vocab_size tokens (reserved ones pad it), trained on Python's pydoc topics; the
    timed runs feed token ids, so it only has to make a valid GGUF vocabulary."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return Tokenizer.train([text[i : i + 4000] for i in range(0, len(text), 4000)], vocab_size=vocab_size)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens from llama.cpp, starting from an empty KV cache (no reuse of the previous round's prompt)."""
    llm.reset()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--check-tokens", type=int, default=32, help="leading greedy tokens that must be identical")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (best counts)")
    p.add_argument("--threads", type=int, default=0, help="threads for both (default 0: all cores)")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("needs llama-cpp-python: .venv/bin/pip install llama-cpp-python (builds llama.cpp from source)")

    threads = set_threads(args.threads or None)
    torch.manual_seed(0)
    cfg = model_config(args)
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gguf(model, stdlib_tokenizer(cfg.vocab_size), Path(tmp) / "bench.gguf")
        f32 = llama_cpp.GGML_TYPE_F32  # llama.cpp's default KV cache is f16; ours is fp32
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=cfg.max_seq_len,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=f32,
            type_v=f32,
            verbose=False,
        )
        prepared = prepare_for_decode(copy.deepcopy(model))
        runs = {
            "lmforge": lambda: list(generate_tokens(prepared, prompt, n)),
            "llama.cpp": lambda: llama_greedy(llm, prompt, n),
        }
        tokens = {name: run() for name, run in runs.items()}
        same = next((i for i, (a, b) in enumerate(zip(*tokens.values(), strict=True)) if a != b), n)
        print(f"greedy tokens identical for the first {same} of {n} (required: {args.check_tokens})")

        best = best_seconds(runs, args.rounds)
    tok_s = {name: n / seconds for name, seconds in best.items()}
    print(f"threads {threads}, {model.num_params() / 1e6:.1f}M params, fp32, batch 1, prompt {len(prompt)}, new {n}")
    print(f"llama-cpp-python {llama_cpp.__version__}, KV cache f32")
    for name, value in tok_s.items():
        print(f"{name:10s} {value:8.1f} tok/s  {value / tok_s['llama.cpp']:5.2f}x llama.cpp")
    if same < min(args.check_tokens, n):
        sys.exit(f"greedy tokens differ at {same}: the GGUF export does not reproduce the model")


if __name__ == "__main__":
    main()
