"""A page for human judgement: two runs' anonymous answers to one prompt, the person's vote (A, B or tie) kept in
SQLite, and a leaderboard of Elo and Bradley-Terry ratings with bootstrap intervals (eval/ratings.py).

Run: lmforge arena RUN_A RUN_B [RUN ...] --prompts prompts.txt --port 8080 [--db FILE]
(then open http://127.0.0.1:8080; the votes go to runs/<RUN_A>/arena.sqlite unless --db names another file)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lmforge import cli_args, sampling
from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.errors import LmforgeError
from lmforge.eval import ratings
from lmforge.eval.arena_page import ARENA_PAGE
from lmforge.run import resolve_run

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (model TEXT, checkpoint TEXT, prompt TEXT, settings TEXT, answer TEXT,
                                    PRIMARY KEY (model, checkpoint, prompt, settings));
CREATE TABLE IF NOT EXISTS pairs (id TEXT PRIMARY KEY, prompt TEXT, model_a TEXT, model_b TEXT, created REAL);
CREATE TABLE IF NOT EXISTS votes (id INTEGER PRIMARY KEY, pair_id TEXT UNIQUE REFERENCES pairs (id),
                                  choice TEXT CHECK (choice IN ('A', 'B', 'tie')), voted REAL);
"""
SCORE = {"A": 1.0, "B": 0.0, "tie": 0.5}


@dataclass
class Contender:
    """A run in the arena: its model, tokenizer, and the checkpoint its cached answers came from."""

    name: str
    model: object
    tokenizer: object
    checkpoint: str


@dataclass
class Settings:
    """How answers are generated: short, and seeded, so a cached answer is the one the run would give again."""

    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0


class VoteRequest(BaseModel):
    pair_id: str = Field(max_length=64)
    choice: Literal["A", "B", "tie"]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one a line) or a .jsonl file ({"prompt": ...} a line); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"prompts file {path} does not exist; give a text file with one prompt a line")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise LmforgeError(f'{path}:{number} is not a JSON object with a "prompt"; fix that line') from None
            if not isinstance(prompt, str) or not prompt.strip():
                raise LmforgeError(f'{path}:{number}: "prompt" must be non-empty text')
            prompts.append(prompt)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise LmforgeError(f"prompts file {path} has no prompts; write one prompt a line")
    return prompts


def load_contenders(runs: list[str]) -> list[Contender]:
    """Each run's newest model; two runs at least, with distinct folder names (the names on the leaderboard)."""
    if len(runs) < 2:
        raise LmforgeError(f"the arena needs at least 2 runs to compare, got {len(runs)}; name two or more runs")
    folders = [resolve_run(run) for run in runs]
    names = [folder.resolve().name for folder in folders]
    if len(set(names)) < len(names):
        raise LmforgeError(f"runs {', '.join(runs)} share folder names ({', '.join(names)}); give distinct runs")
    contenders = []
    for name, folder in zip(names, folders, strict=True):
        model, tokenizer = load_run(folder)
        checkpoint = latest_checkpoint(folder)
        contenders.append(Contender(name, model, tokenizer, checkpoint.name if checkpoint else ""))
    return contenders


def build_app(
    contenders: list[Contender],
    prompts: list[str],
    db_path: str | Path,
    settings: Settings | None = None,
    seed: int | None = None,
    rounds: int = 200,
) -> FastAPI:
    """The arena's app: the page at /, POST /api/pair for a new pair, POST /api/vote, GET /api/leaderboard.
    `seed` fixes which prompts and pairs are drawn (default: random); `rounds` is the bootstrap's resamples."""
    settings = settings or Settings()
    by_name = {c.name: c for c in contenders}
    rng = random.Random(seed)
    db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)  # autocommit: a vote lands at once
    db.executescript(SCHEMA)
    lock, generating = threading.Lock(), threading.Lock()  # one connection and one model run at a time

    def query(sql: str, args: tuple = ()) -> list[tuple]:
        with lock:
            return db.execute(sql, args).fetchall()

    def answer(contender: Contender, prompt: str) -> str:
        """The contender's answer to `prompt`, from the cache or generated (and cached)."""
        key = (contender.name, contender.checkpoint, prompt, json.dumps(settings.__dict__, sort_keys=True))
        with generating:
            cached = query("SELECT answer FROM answers WHERE model=? AND checkpoint=? AND prompt=? AND settings=?", key)
            if cached:
                return cached[0][0]
            s = settings
            try:
                pieces = sampling.generate(
                    contender.model, contender.tokenizer, prompt, s.max_new_tokens, s.temperature, top_p=s.top_p,
                    seed=s.seed,
                )  # fmt: skip
                text = "".join(pieces)
            except LmforgeError as e:
                raise HTTPException(422, f"{contender.name} cannot answer this prompt: {e}") from None
            query("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?)", (*key, text))
            return text

    def board() -> dict:
        rows = query(
            "SELECT p.model_a, p.model_b, v.choice FROM votes v JOIN pairs p ON p.id = v.pair_id ORDER BY v.id"
        )
        votes = [(a, b, SCORE[choice]) for a, b, choice in rows]
        return {"votes": len(votes), "models": ratings.leaderboard(votes, list(by_name), rounds)}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        db.close()

    app = FastAPI(title="lmforge arena", lifespan=lifespan)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return ARENA_PAGE

    @app.post("/api/pair")
    async def new_pair() -> dict:
        with lock:  # the draw under the lock: requests at once still follow the seeded sequence
            prompt = rng.choice(prompts)
            a, b = rng.sample(contenders, 2)
        answers = [await run_in_threadpool(answer, c, prompt) for c in (a, b)]
        pair_id = uuid.uuid4().hex
        query("INSERT INTO pairs VALUES (?, ?, ?, ?, ?)", (pair_id, prompt, a.name, b.name, time.time()))
        return {"pair_id": pair_id, "prompt": prompt, "a": answers[0], "b": answers[1]}

    @app.post("/api/vote")
    async def vote(req: VoteRequest) -> dict:
        pair = query("SELECT model_a, model_b FROM pairs WHERE id=?", (req.pair_id,))
        if not pair:
            raise HTTPException(404, f"pair {req.pair_id!r} not found; ask /api/pair for a new one")
        try:
            query("INSERT INTO votes (pair_id, choice, voted) VALUES (?, ?, ?)", (req.pair_id, req.choice, time.time()))
        except sqlite3.IntegrityError:
            raise HTTPException(409, f"pair {req.pair_id!r} already has a vote; ask /api/pair for a new one") from None
        return {"a": pair[0][0], "b": pair[0][1], "leaderboard": await run_in_threadpool(board)}

    @app.get("/api/leaderboard")
    async def leaderboard() -> dict:
        return await run_in_threadpool(board)

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="two or more run folders or run names under runs/")
    parser.add_argument("--prompts", required=True, help='text file, one prompt a line, or .jsonl of {"prompt": ...}')
    parser.add_argument("--port", type=cli_args.port, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--db", default=None, help="SQLite file of answers and votes (default: <first run>/arena.sqlite)"
    )
    defaults = Settings()
    parser.add_argument(
        "--max-new-tokens", type=cli_args.positive_int, default=defaults.max_new_tokens,
        help=f"most tokens an answer has (default {defaults.max_new_tokens})",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=cli_args.non_negative_float, default=defaults.temperature,
        help=f"sampling temperature of the answers; 0 is greedy (default {defaults.temperature})",
    )  # fmt: skip
    parser.add_argument("--seed", type=cli_args.integer, default=None, help="seed of the prompts and pairs drawn")


def command(args: argparse.Namespace) -> None:
    import uvicorn

    prompts = read_prompts(args.prompts)
    contenders = load_contenders(args.runs)
    db = Path(args.db) if args.db else resolve_run(args.runs[0]) / "arena.sqlite"
    if not db.parent.is_dir():
        raise LmforgeError(f"--db {db}: folder {db.parent} does not exist; create it or give another path")
    settings = Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(f"arena: {len(contenders)} runs, {len(prompts)} prompts, votes in {db}; open http://{args.host}:{args.port}")
    uvicorn.run(build_app(contenders, prompts, db, settings, args.seed), host=args.host, port=args.port)
