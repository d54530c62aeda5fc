"""Soak: `lmforge serve` under hundreds of concurrent streams whose clients disconnect mid-stream or cancel before
the first token. Checks that no KV block or sequence is left behind and that the server's RSS comes back within
10% of its warm level, and prints time to first token p50/p99.

    .venv/bin/python benchmarks/bench_soak.py                        # 500 streams x 2 rounds, ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_soak.py --run runs/speedrun    # the default when runs/speedrun exists
    .venv/bin/python benchmarks/bench_soak.py --streams 200 --rounds 3

Without --run (and no runs/speedrun) it serves a random 2-layer model (dim 64, context 128) with a tokenizer
trained on lmforge's own code. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

WORDS = [w for w in Path(__file__).read_text().split() if w.isalpha()]  # prompts: words of this file


def tiny_run(folder: Path) -> Path:
    """A run folder with a tokenizer and a step-0 checkpoint of a random 2-layer model."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.models import ModelConfig, build_model
    from lmforge.tokenizer import Tokenizer

    text = "\n".join(p.read_text() for p in sorted((ROOT / "lmforge").rglob("*.py")))[:200_000]
    Tokenizer.train([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=512).save(folder)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)
    save_checkpoint(folder, 0, build_model(cfg, seed=0), state={})
    return folder


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def gauges(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


class Tally:
    def __init__(self):
        self.ttft: list[float] = []
        self.kinds: dict[str, int] = {}
        self.statuses: dict[int, int] = {}
        self.failures: list[str] = []
        self.tokens = 0


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, tally: Tally) -> None:
    """One client: `full` reads the whole stream, `disconnect` leaves after a few events, `plain` waits for a
    non-streamed answer; `cancel` is one of these, cancelled from outside at a random moment."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 16)))
    body = {"model": "soak", "prompt": prompt, "max_tokens": rng.randrange(16, 64), "temperature": rng.choice([0, 0.8])}
    began = time.perf_counter()
    if kind == "plain":
        response = await client.post("/v1/completions", json=body)
        tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
        if response.status_code == 200:
            tally.tokens += response.json()["usage"]["completion_tokens"]
        return
    leave_after = rng.randrange(1, 6) if kind == "disconnect" else None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        tally.statuses[response.status_code] = tally.statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            return
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if events == 0:
                tally.ttft.append(time.perf_counter() - began)
            events += 1
            tally.tokens += bool(json.loads(line[6:])["choices"][0]["text"])
            if events == leave_after:
                return  # leaving the block closes the connection mid-stream


async def load(url: str, streams: int, rng: random.Random, pid: int) -> tuple[Tally, int, float]:
    """All clients at once; returns the tally, the peak RSS seen while they ran, and the seconds it took."""
    tally, peak = Tally(), rss_bytes(pid)
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600, connect=60)) as client:

        async def client_task(kind: str, seed: int) -> None:
            try:
                await one_request(client, kind, random.Random(seed), tally)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a dropped connection or a malformed answer: the server failed a client
                tally.failures.append(f"{kind}: {type(e).__name__}: {e}")

        began = time.perf_counter()
        tasks = []
        for _ in range(streams):
            kind = rng.choices(["full", "disconnect", "cancel", "plain"], weights=[5, 3, 2, 1])[0]
            tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
            inner = rng.choice(["full", "plain"]) if kind == "cancel" else kind
            tasks.append(asyncio.create_task(client_task(inner, rng.randrange(1 << 30))))
            if kind == "cancel":
                asyncio.get_running_loop().call_later(rng.uniform(0.0, 3.0), tasks[-1].cancel)
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally, peak, time.perf_counter() - began


def wait_idle(url: str, timeout: float = 120.0) -> dict[str, float]:
    """The server's gauges once nothing runs or waits (or at the timeout): leaked blocks show as blocks used."""
    deadline = time.monotonic() + timeout
    while True:
        g = gauges(url)
        idle = not (g["lmforge_running_sequences"] or g["lmforge_waiting_requests"] or g["lmforge_kv_blocks_used"])
        if idle or time.monotonic() > deadline:
            return g
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="run folder to serve (default: runs/speedrun if it exists)")
    parser.add_argument("--streams", type=int, default=500, help="concurrent clients per round (default 500)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of load (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="lmforge-soak-") as tmp:
        speedrun = ROOT / "runs" / "speedrun"
        run = Path(args.run) if args.run else speedrun if speedrun.is_dir() else tiny_run(Path(tmp))
        if not run.is_dir():
            sys.exit(f"run folder {run} does not exist; give --run a run folder or leave it out")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        flags = ["--name", "soak", "--port", str(port), "--max-waiting", str(2 * args.streams)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = Path(tmp) / "server.log"
        with log.open("w") as out:
            command = [sys.executable, "-m", "lmforge", "serve", str(run), *flags]
            server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            ok = report(url, server.pid, run, args, rng)
        finally:
            server.terminate()
            server.wait(timeout=30)
        if not ok:
            errors = [line for line in log.read_text().splitlines() if "INFO:" not in line]
            print("server log, without its access lines:", *errors[-20:], sep="\n")
            sys.exit(1)


def report(url: str, pid: int, run: Path, args, rng: random.Random) -> bool:
    """Warm the server up, run the rounds of load and print each; True when every check held."""
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/health", timeout=5)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                sys.exit("the server did not start in 120 s")
            time.sleep(0.2)
    # warm: every code path once (the C kernels, prefix cache, tokenizer), then the level RSS must come back to
    asyncio.run(load(url, 32, random.Random(-1), pid))
    wait_idle(url)
    warm = rss_bytes(pid)
    print(f"serving {run} (pid {pid}); warm RSS {warm / 2**20:.0f} MiB; {args.streams} clients x {args.rounds} rounds")
    ok = True
    for r in range(args.rounds):
        tally, peak, seconds = asyncio.run(load(url, args.streams, rng, pid))
        after = wait_idle(url)
        rss = rss_bytes(pid)
        ttft = sorted(tally.ttft)
        p50 = statistics.median(ttft) if ttft else float("nan")
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan")
        leaked = (
            after["lmforge_kv_blocks_used"] + after["lmforge_running_sequences"] + after["lmforge_waiting_requests"]
        )
        grew = rss / warm - 1
        print(
            f"round {r + 1}: {sum(tally.kinds.values())} clients {tally.kinds} in {seconds:.1f} s; statuses "
            f"{tally.statuses}; {tally.tokens} tokens streamed; TTFT p50 {p50:.2f} s p99 {p99:.2f} s "
            f"({len(ttft)} first tokens); RSS peak {peak / 2**20:.0f} MiB, after {rss / 2**20:.0f} MiB "
            f"({grew:+.1%} of warm); blocks used after {after['lmforge_kv_blocks_used']:.0f} of "
            f"{after['lmforge_kv_blocks_used'] + after['lmforge_kv_blocks_free']:.0f}"
        )
        for failure in tally.failures[:5]:
            print(f"  client failure: {failure}")
        ok &= not tally.failures and not leaked and grew <= 0.10 and 500 not in tally.statuses
    print("PASS: no leaked blocks or sequences, RSS within 10% of warm" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    main()
