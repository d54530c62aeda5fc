"""Compressed CPU inference: lmforge's int8 and int4 kernels (cpu/decode_kernels.c) against lmforge fp32 and against
llama.cpp's Q8_0 and Q4_0 on the same weights, batch-1 greedy decode and 32 concurrent requests.

    .venv/bin/python benchmarks/bench_compress.py --llama-server /path/to/llama-server          # SmolLM2-135M
    .venv/bin/python benchmarks/bench_compress.py --llama-server ... --run /work/runs/smol --threads 2 --skip-serve

The peer is llama.cpp's own server, built from the llama.cpp sources that llama-cpp-python's sdist vendors:

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
    cmake --build build --target llama-server -j 2      # build/bin/llama-server

Both sides get the same weights: lmforge quantizes the run's model by round to nearest (int8 one scale per output
channel, int4 groups of 32 with a scale each, the LM head too, as `lmforge compress RUN method=int8 quant.head=true`
writes it), and the GGUF files are the fp32 export (lmforge.interop.gguf) requantized to Q8_0 / Q4_0 (blocks of 32,
one scale each, token embedding and head included) by the gguf package's own quantizer. KV caches are fp32 on both.
llama-server runs with --no-repack: in this build its AVX-512 repacking of the weights crashes on the first run.
Decode speed is the steps after the prompt (llama.cpp's own timings.predicted_per_second; ours from the first token to
the last); the serving figure is output tokens over the wall time of the whole workload (bench_serve.py's requests),
with llama-server's continuous batching over 32 slots. Rounds alternate so that load from other processes hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.bench_serve import NoEos, run_engine, workload  # noqa: E402
from benchmarks.machine import set_threads  # noqa: E402
from lmforge.checkpoint import load_run  # noqa: E402
from lmforge.compress.rtn import quantize_rtn  # noqa: E402
from lmforge.interop.gguf import write_gguf  # noqa: E402
from lmforge.serve.engine import Engine, EngineConfig  # noqa: E402
from lmforge.serve.generate import generate_tokens, prepare_for_decode  # noqa: E402


def requantize(f32: Path, out: Path, qtype: str) -> Path:
    """A copy of an fp32 GGUF file with every matrix quantized to qtype ("Q8_0", "Q4_0") by gguf.quants."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(f32)
    writer = gguf.GGUFWriter(out, "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}"))
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if data.ndim == 2:
            writer.add_tensor(tensor.name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class LlamaServer:
    """llama-server on a loopback port for the life of a `with` block."""

    def __init__(self, binary: str, model: Path, threads: int, slots: int, context: int, port: int = 18431):
        self.url = f"http://127.0.0.1:{port}"
        self.command = [binary, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", str(slots)]
        self.command += ["-c", str(context * slots), "-ctk", "f32", "-ctv", "f32", "--port", str(port), "-cb"]
        self.command += ["--no-repack"]  # its repacking of Q8_0 weights for AVX-512 crashes (a protection fault) here
        self.command += ["--no-webui"] if "--no-webui" in self._help(binary) else []

    @staticmethod
    def _help(binary: str) -> str:
        return subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60).stdout

    def __enter__(self) -> LlamaServer:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(600):
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if json.load(r).get("status") == "ok":
                        return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"llama-server exited: {self.process.stderr.read()[-2000:]}") from None
            time.sleep(0.5)
        raise RuntimeError("llama-server did not start in 5 minutes")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def complete(self, prompt: list[int], n: int) -> dict:
        body = {"prompt": prompt, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True}
        body |= {"cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}
        request = urllib.request.Request(
            self.url + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=1800) as r:
            return json.load(r)


def ours_decode(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    """(decode tok/s from the first token to the last, the tokens)."""
    tokens, stamps = [], []
    for token in generate_tokens(model, prompt, n):
        tokens.append(token)
        stamps.append(time.perf_counter())
    return (len(tokens) - 1) / (stamps[-1] - stamps[0]), tokens


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def serve_llama(server: LlamaServer, requests) -> float:
    """Seconds for all requests sent at once to llama-server."""
    threads = [threading.Thread(target=server.complete, args=(p, n)) for p, n in requests]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="/work/runs/smol", help="the fp32 run to quantize (a Llama-style model)")
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server binary (without: lmforge's figures only)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (best counts)")
    p.add_argument("--threads", type=int, default=0, help="threads for both (default 0: all cores)")
    p.add_argument("--skip-serve", action="store_true", help="batch-1 decode only")
    args = p.parse_args()
    threads = set_threads(args.threads or None)

    base, tokenizer = load_run(args.run)
    base = base.eval()
    models = {"fp32": prepare_for_decode(copy.deepcopy(base))}
    for name, bits, group in (("int8", 8, 0), ("int4", 4, 32)):
        models[name] = copy.deepcopy(base)
        quantize_rtn(models[name], bits, group, symmetric=True, head=True)
    vocab, n = base.cfg.vocab_size, args.new_tokens
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    context = min(base.cfg.max_seq_len, 256)

    with tempfile.TemporaryDirectory() as tmp:
        ggufs, decode, tokens = {}, {}, {}
        if args.llama_server:
            f32 = write_gguf(base, tokenizer, Path(tmp) / "f32.gguf")
            ggufs = {q: requantize(f32, Path(tmp) / f"{q}.gguf", q) for q in ("Q8_0", "Q4_0")}
        for model in models.values():
            ours_decode(model, prompt, 8)  # warm-up: kernels built, pages touched
        for qtype in [*ggufs] or [None]:
            server = LlamaServer(args.llama_server, ggufs[qtype], threads, 1, context) if qtype else None
            with server or contextlib.nullcontext():
                if server:
                    server.complete(prompt, 8)
                for _ in range(args.rounds):
                    for name, model in models.items():
                        rate, tokens[name] = ours_decode(model, prompt, n)
                        decode[name] = max(decode.get(name, 0.0), rate)
                    if server:
                        out = server.complete(prompt, n)
                        decode[qtype] = max(decode.get(qtype, 0.0), out["timings"]["predicted_per_second"])
                        tokens[qtype] = out.get("tokens", [])
        print(f"threads {threads}, {args.run}, {base.num_params() / 1e6:.1f}M params, batch 1, prompt {len(prompt)}")
        print(f"greedy decode, {n} tokens, best of {args.rounds} (tokens agreeing with lmforge fp32):")
        for name, rate in decode.items():
            print(f"  {name:5s} {rate:8.1f} tok/s   agree {agreement(tokens[name], tokens['fp32']):3d}")
        print(f"  int8 / fp32  {decode['int8'] / decode['fp32']:5.2f}x  (target >= 1.8x)")
        if ggufs:
            print(f"  int8 / Q8_0  {decode['int8'] / decode['Q8_0']:5.2f}x  (target >= 1.0x)")
            print(f"  int4 / Q4_0  {decode['int4'] / decode['Q4_0']:5.2f}x  (target >= 1.0x)")
        if args.skip_serve:
            return

        requests = [(p[: context // 4], min(new, context // 2)) for p, new in workload(args.requests, vocab)]
        useful = sum(new for _, new in requests)
        engine_cfg = EngineConfig(args.requests, max_batched_tokens=512, prefix_caching=False)
        engines = {name: Engine(models[name], NoEos(), engine_cfg) for name in ("fp32", "int8")}
        for engine in engines.values():
            run_engine(engine, requests[:4])  # warm-up, as a server runs it
        seconds = dict.fromkeys([*engines, *(["Q8_0"] if ggufs else [])], float("inf"))
        server = LlamaServer(args.llama_server, ggufs["Q8_0"], threads, args.requests, context) if ggufs else None
        with server or contextlib.nullcontext():
            if server:
                serve_llama(server, requests[:4])
            for _ in range(max(1, args.rounds - 1)):
                for name, engine in engines.items():
                    seconds[name] = min(seconds[name], run_engine(engine, requests)[0])
                if server:
                    seconds["Q8_0"] = min(seconds["Q8_0"], serve_llama(server, requests))
        print(
            f"{args.requests} concurrent requests, {useful} output tokens (Q8_0: llama-server, {args.requests} slots):"
        )
        for name, value in seconds.items():
            print(f"  {name:5s} {useful / value:8.1f} tok/s  ({value:.2f} s)")
        print(f"  int8 / fp32  {seconds['fp32'] / seconds['int8']:5.2f}x")
        if server:
            print(f"  int8 / Q8_0  {seconds['Q8_0'] / seconds['int8']:5.2f}x  (target >= 1.0x)")


if __name__ == "__main__":
    main()
