"""A longer run of the server fuzz test (tests/serve/test_fuzz.py): the same generated JSON against a tiny model on
loopback, random examples unless --seed is given; prints the answers' status counts and the first failure.

    .venv/bin/python benchmarks/fuzz_server.py --examples 2000          # ~15 min on 2 cores
    .venv/bin/python benchmarks/fuzz_server.py --examples 300 --seed 1  # reproducible
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import torch
import uvicorn
from hypothesis import HealthCheck, given, seed, settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.serve.engine import Engine, EngineConfig  # noqa: E402
from lmforge.serve.generate import prepare_for_decode  # noqa: E402
from lmforge.serve.server import build_app  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from tests.serve.test_fuzz import CHAT, CHAT_COMPLETIONS, COMPLETION, COMPLETIONS, VOCAB, exchange, wait_idle  # noqa: E402


def tiny_engine() -> Engine:
    """The tests' tiny model (2 layers, dim 64, vocab 512, context 128) with a tokenizer trained on this repo's code."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "lmforge").rglob("*.py")))[:200_000]
    tokenizer = Tokenizer.train([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=VOCAB)
    cfg = ModelConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)
    model = build_model(cfg, seed=0)
    prepare_for_decode(model)
    return Engine(model, tokenizer, EngineConfig(block_size=8, max_waiting=64))


def serve(app) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="examples per endpoint (default 500)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = tiny_engine()
    app = build_app(engine, "tiny")
    server, url = serve(app)
    served = types.SimpleNamespace(engine=engine, app=app)
    statuses: collections.Counter = collections.Counter()
    began = time.perf_counter()
    checks = settings(max_examples=args.examples, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    with httpx.Client(base_url=url, timeout=60) as client:

        def fuzz(path: str, bodies) -> None:
            @checks
            @given(body=bodies)
            def run(body):
                statuses[path, exchange(client, path, body)] += 1
                wait_idle(served)

            (run if args.seed is None else seed(args.seed)(run))()

        fuzz(COMPLETIONS, COMPLETION)
        fuzz(CHAT_COMPLETIONS, CHAT)
    server.should_exit = True
    print(f"{sum(statuses.values())} requests in {time.perf_counter() - began:.0f} s, none failed; by status:")
    for (path, status), count in sorted(statuses.items()):
        print(f"  {path:24s} {status}  {count}")


if __name__ == "__main__":
    main()
