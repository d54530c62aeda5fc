"""Whole data-preparation pipeline throughput (MB of input per second, per worker) and peak memory, with workers=1 and
workers=2, on a generated web-like corpus (prose that passes the quality rules, 10% exact and 10% near duplicates,
some PII), each configuration in a fresh process so its peak RSS is its own.

    .venv/bin/python benchmarks/bench_prepare.py              # 16 MB in 32 files, ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_prepare.py --mb 64 --workers 1 2 4

Peak memory is the largest resident set of the main process and of any one worker (getrusage maxrss); with shards
of --shard-mb it should stay near the shard size times the workers plus the interpreter, whatever --mb is.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

WORDS = str.split(
    "the of and to in that with have be river garden window market teacher morning silver planet engine harbor "
    "letter forest village winter summer candle bridge doctor kitchen mountain painter station journey pocket "
    "ribbon valley thunder orange meadow castle lantern button feather compass blanket pepper saddle island "
    "tunnel marble quietly slowly bright gentle narrow ancient modern simple careful hidden golden wooden distant "
    "walks builds carries watches finds opens gathers follows repairs describes measures remembers"
)


def generate(folder: Path, mb: int, files: int, seed: int = 0) -> int:
    """JSONL files of ~1.5 KB documents; returns the bytes written."""
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS + [f"word{i}" for i in range(20_000)])
    per_file = mb * (1 << 20) // files
    docs: list[str] = []
    total = 0
    for f in range(files):
        lines, size = [], 0
        while size < per_file:
            roll = rng.random()
            if docs and roll < 0.1:
                text = docs[rng.integers(len(docs))]  # exact duplicate
            elif docs and roll < 0.2:
                words = docs[rng.integers(len(docs))].split(" ")
                words[rng.integers(len(words))] = "changed"  # near duplicate (Jaccard ~0.95)
                text = " ".join(words)
            else:
                sentences = []
                for _ in range(20):
                    body = " ".join(vocab[rng.integers(0, vocab.size, 11)])
                    sentences.append(f"The {body} with the {vocab[rng.integers(9, 70)]}.")
                text = " ".join(sentences)
                if roll > 0.97:
                    n = rng.integers(1000, 9999)
                    text += f" Write to user{n}@example.com or call +1 415 555 {n}."
                docs.append(text)
            line = json.dumps({"text": text}) + "\n"
            lines.append(line)
            size += len(line)
        (folder / f"part_{f:04d}.jsonl").write_text("".join(lines))
        total += size
    return total


def run_once(corpus: str, output: str, workers: int, shard_mb: int) -> None:
    from lmforge.config import load_config
    from lmforge.data.prepare import DataPrepConfig, main

    overrides = [f"input={corpus}", f"output={output}", f"workers={workers}", f"shard_bytes={shard_mb << 20}"]
    cfg = load_config(DataPrepConfig, Path(__file__).resolve().parent.parent / "configs/data/web.yaml", overrides)
    t0 = time.perf_counter()
    stats = main(cfg)
    seconds = time.perf_counter() - t0
    peak = {who: resource.getrusage(w).ru_maxrss / 1024 for who, w in (("main", 0), ("worker", -1))}  # KiB -> MiB
    print(json.dumps({"seconds": seconds, "docs_in": stats["docs_in"], "docs_out": stats["docs_out"], **peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=16, help="corpus size")
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--shard-mb", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--run", nargs=3, metavar=("CORPUS", "OUTPUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_once(args.run[0], args.run[1], int(args.run[2]), args.shard_mb)
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        nbytes = generate(corpus, args.mb, args.files)
        print(f"corpus: {nbytes / 1e6:.1f} MB in {args.files} JSONL files, shards of {args.shard_mb} MB")
        print("workers   seconds   MB/s   MB/s per worker   peak RSS main / worker (MiB)   docs in -> out")
        for workers in args.workers:
            out = Path(tmp) / f"out_{workers}"
            cmd = [sys.executable, __file__, "--shard-mb", str(args.shard_mb), "--run", str(corpus), str(out)]
            result = subprocess.run([*cmd, str(workers)], capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            mbps = nbytes / 1e6 / r["seconds"]
            print(
                f"{workers:7d} {r['seconds']:9.1f} {mbps:6.2f} {mbps / workers:17.2f}   "
                f"{r['main']:12.0f} / {r['worker'] if workers > 1 else float('nan'):6.0f}"
                f"               {r['docs_in']} -> {r['docs_out']}"
            )


if __name__ == "__main__":
    main()
