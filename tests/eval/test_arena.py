"""The arena's ratings against choix and their invariants, its input errors (exit 2), and its JSON API: votes land,
bad requests get a 4xx and the server keeps serving, cached answers survive a restart."""

from __future__ import annotations

import json
import random
import sqlite3

import choix
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.eval import ratings
from lmforge.eval.arena import SCORE, Settings, build_app, load_contenders, read_prompts
from lmforge.models import ModelConfig, build_model

MODELS = ["m0", "m1", "m2", "m3", "m4"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_tokenizer):
    """Two tiny runs, alpha and beta: the same 2-layer model shape with other random weights."""
    root = tmp_path_factory.mktemp("runs")
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=128)
    for seed, name in enumerate(["alpha", "beta"]):
        tiny_tokenizer.save(root / name)
        save_checkpoint(root / name, 0, build_model(cfg, seed=seed), state={})
    return [root / "alpha", root / "beta"]


def random_votes(n: int, seed: int) -> list[ratings.Vote]:
    rng = random.Random(seed)
    strength = {m: i for i, m in enumerate(MODELS)}
    votes = []
    for _ in range(n):
        a, b = rng.sample(MODELS, 2)
        win = 1 / (1 + np.exp(strength[b] - strength[a]))
        votes.append((a, b, 0.5 if rng.random() < 0.2 else float(rng.random() < win)))
    return votes


@pytest.mark.parametrize("n, alpha", [(40, ratings.BT_ALPHA), (300, ratings.BT_ALPHA), (300, 1.0)])
def test_bradley_terry_equals_choix(n, alpha):
    votes = random_votes(n, seed=n)
    votes += [("m4", "m0", 1.0)] * 3  # m4 also beats m0 outright, where a fit without a penalty would not be finite
    # choix counts whole wins: each decisive vote twice and each tie once each way doubles our objective, alpha too
    pairs = []
    for a, b, score in votes:
        i, j = MODELS.index(a), MODELS.index(b)
        pairs += {1.0: [(i, j)] * 2, 0.0: [(j, i)] * 2, 0.5: [(i, j), (j, i)]}[score]
    expected = choix.opt_pairwise(len(MODELS), pairs, alpha=2 * alpha, tol=1e-12)
    theta = ratings.bradley_terry(ratings.win_matrix(votes, MODELS), alpha)
    np.testing.assert_allclose(theta - theta.mean(), expected - expected.mean(), atol=1e-6)
    assert abs(theta.mean()) < 1e-9  # the penalty centres the fit: no normalisation needed on our side
    bt = ratings.bt_ratings(votes, MODELS, alpha)
    np.testing.assert_allclose([bt[m] for m in MODELS], 1000 + 400 / np.log(10) * theta)


def test_elo_online_updates():
    assert ratings.elo([("a", "b", 1.0)], ["a", "b"]) == {"a": 1002.0, "b": 998.0}  # K=4, even odds at the start
    assert ratings.elo([("a", "b", 0.5)], ["a", "b"]) == {"a": 1000.0, "b": 1000.0}
    votes = random_votes(200, seed=1)
    elo = ratings.elo(votes, MODELS)
    assert sum(elo.values()) == pytest.approx(1000 * len(MODELS))  # every update is zero-sum
    assert ratings.elo(votes[::-1], MODELS) != elo  # online: the order counts
    assert max(elo, key=elo.get) == "m4" and min(elo, key=elo.get) == "m0"
    big_k = ratings.elo(votes, MODELS, k=32)
    assert big_k["m4"] - big_k["m0"] > elo["m4"] - elo["m0"]


def test_bootstrap_is_seeded_and_narrows_with_votes():
    few, many = random_votes(30, seed=2), random_votes(600, seed=3)
    interval = ratings.bootstrap(few, MODELS, rounds=100, seed=0)
    assert interval == ratings.bootstrap(few, MODELS, rounds=100, seed=0)
    assert interval != ratings.bootstrap(few, MODELS, rounds=100, seed=1)
    bt = ratings.bt_ratings(many, MODELS)
    wide = ratings.bootstrap(many, MODELS, rounds=100, seed=0)
    for m in MODELS:
        assert wide[m][0] <= bt[m] <= wide[m][1]
        assert wide[m][1] - wide[m][0] < interval[m][1] - interval[m][0]
    rows = ratings.leaderboard(many, MODELS, rounds=20)
    assert [r["model"] for r in rows] == sorted(MODELS, key=bt.get, reverse=True)
    assert sum(r["votes"] for r in rows) == 2 * len(many)


def test_prompts_from_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("What is a list?\n\n  Say hi \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "What is a list?"}\n\n{"prompt": "line\\ntwo", "id": 3}\n')
    assert read_prompts(tmp_path / "p.txt") == ["What is a list?", "Say hi"]
    assert read_prompts(tmp_path / "p.jsonl") == ["What is a list?", "line\ntwo"]


@pytest.mark.parametrize(
    "runs, prompts, message",
    [
        (["A", "B"], None, "prompts file nope.txt does not exist"),
        (["A", "B"], "", "has no prompts"),
        (["A", "B"], "\n  \n", "has no prompts"),
        (["A", "B"], '{"text": "x"}\n', 'p.jsonl:1 is not a JSON object with a "prompt"'),
        (["A"], "hi\n", "the arena needs at least 2 runs to compare, got 1"),
        (["A", "no-such-run"], "hi\n", "run 'no-such-run' not found"),
        (["A", "A"], "hi\n", "share folder names"),
    ],
)
def test_bad_input_exits_2_with_one_line(two_runs, tmp_path, monkeypatch, capsys, runs, prompts, message):
    monkeypatch.chdir(tmp_path)
    path = "nope.txt"
    if prompts is not None:
        path = "p.jsonl" if prompts.startswith("{") else "p.txt"
        (tmp_path / path).write_text(prompts)
    names = [str(two_runs[0]) if r == "A" else r for r in runs]
    with pytest.raises(SystemExit) as exit_:
        main(["arena", *names, "--prompts", path, "--port", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (two_runs[0] / "arena.sqlite").exists()


def test_api_records_votes_refuses_bad_ones_and_keeps_answers(two_runs, tmp_path):
    contenders = load_contenders([str(r) for r in two_runs])
    prompts, db = ["What is a list?", "def main():"], tmp_path / "arena.sqlite"
    settings = Settings(max_new_tokens=8)
    with TestClient(build_app(contenders, prompts, db, settings, seed=0, rounds=20)) as client:
        pairs = [client.post("/api/pair").json() for _ in range(4)]
        assert {p["prompt"] for p in pairs} <= set(prompts) and all(p["a"] and p["b"] for p in pairs)
        for bad, status in [
            ({"pair_id": "nope", "choice": "A"}, 404),
            ({"pair_id": pairs[0]["pair_id"], "choice": "C"}, 422),
            ({"pair_id": pairs[0]["pair_id"]}, 422),
            ({"pair_id": "x" * 1000, "choice": "A"}, 422),
        ]:
            assert client.post("/api/vote", json=bad).status_code == status
        assert client.post(
            "/api/vote", content=b"{not json", headers={"content-type": "application/json"}
        ).is_client_error
        for pair, choice in zip(pairs, ["A", "B", "tie"], strict=False):
            shown = client.post("/api/vote", json={"pair_id": pair["pair_id"], "choice": choice}).json()
            assert {shown["a"], shown["b"]} == {"alpha", "beta"}
            pair |= {"models": (shown["a"], shown["b"]), "choice": choice}
        again = client.post("/api/vote", json={"pair_id": pairs[0]["pair_id"], "choice": "B"})
        assert again.status_code == 409
        board = client.get("/api/leaderboard").json()
    votes = [(*p["models"], SCORE[p["choice"]]) for p in pairs[:3]]
    assert board == {"votes": 3, "models": ratings.leaderboard(votes, ["alpha", "beta"], rounds=20)}
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT choice FROM votes ORDER BY id").fetchall() == [("A",), ("B",), ("tie",)]
        assert con.execute("SELECT count(*) FROM answers").fetchone() == (4,)  # 2 runs x 2 prompts, each once
        con.execute("UPDATE answers SET answer = 'from the cache'")
    # a restart on the same file answers from the cache, and keeps counting the old votes
    with TestClient(build_app(contenders, prompts, db, settings, seed=1, rounds=20)) as client:
        pair = client.post("/api/pair").json()
        assert pair["a"] == pair["b"] == "from the cache"
        assert client.get("/api/leaderboard").json()["votes"] == 3
    # other generation settings are other answers
    with TestClient(build_app(contenders, prompts, db, Settings(max_new_tokens=4), rounds=20)) as client:
        assert client.post("/api/pair").json()["a"] != "from the cache"
    assert json.loads(sqlite3.connect(db).execute("SELECT settings FROM answers").fetchone()[0])["max_new_tokens"]


def test_a_prompt_too_long_for_a_run_is_a_422_and_the_server_keeps_serving(two_runs, tmp_path):
    contenders = load_contenders([str(r) for r in two_runs])
    app = build_app(contenders, ["word " * 400], tmp_path / "arena.sqlite", Settings(max_new_tokens=4), rounds=5)
    with TestClient(app) as client:
        refused = client.post("/api/pair")
        assert refused.status_code == 422 and "cannot answer this prompt" in refused.json()["detail"]
        assert client.get("/api/leaderboard").json()["votes"] == 0
