"""The arena page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright): clicks on A, B and tie land
in the SQLite file, survive a restart of the server on the same file, and move the leaderboard."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from lmforge.checkpoint import save_checkpoint
from lmforge.eval import ratings
from lmforge.eval.arena import SCORE, Settings, build_app, load_contenders
from lmforge.models import ModelConfig, build_model

CHROMIUM = "/usr/bin/chromium"  # the distribution's browser: Playwright downloads none


@pytest.fixture(scope="module")
def contenders(tmp_path_factory, tiny_tokenizer):
    """Two tiny runs, alpha and beta (the same 2-layer shape, other random weights), loaded."""
    root = tmp_path_factory.mktemp("runs")
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=64, max_seq_len=128)
    for seed, name in enumerate(["alpha", "beta"]):
        tiny_tokenizer.save(root / name)
        save_checkpoint(root / name, 0, build_model(cfg, seed=seed), state={})
    return load_contenders([str(root / "alpha"), str(root / "beta")])


def vote(page: Page, button: str) -> tuple[str, str]:
    """Wait for a pair, click `button`, wait for the names; returns the models shown as A and B."""
    pair = page.locator("#answers[data-pair]")
    pair.wait_for(timeout=20_000)
    pair_id = pair.get_attribute("data-pair")
    assert page.inner_text("#answer-a") and page.inner_text("#answer-b") and page.inner_text("#prompt")
    assert page.inner_text("#name-a") == page.inner_text("#name-b") == ""  # anonymous until the vote
    page.click(button)
    page.locator(f'#answers[data-voted="{pair_id}"]').wait_for(timeout=20_000)
    return page.inner_text("#name-a").strip("()"), page.inner_text("#name-b").strip("()")


def shown_board(page: Page) -> dict[str, list[str]]:
    return {
        row.get_attribute("data-model"): row.locator("td").all_inner_texts()
        for row in page.locator("tr[data-model]").all()
    }


def test_votes_land_survive_a_restart_and_move_the_leaderboard(contenders, tmp_path, live_server):
    db, prompts, settings = tmp_path / "arena.sqlite", ["What is a list?", "def main():"], Settings(max_new_tokens=8)
    votes = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            with live_server(build_app(contenders, prompts, db, settings, seed=0, rounds=20)) as url:
                page = browser.new_page()
                page.goto(url + "/")
                page.locator('#total[data-votes="0"]').wait_for(timeout=20_000)
                for button, choice in [("#vote-a", "A"), ("#vote-b", "B"), ("#vote-tie", "tie")]:
                    if votes:
                        page.click("#next")
                    votes.append((*vote(page, button), SCORE[choice]))
                    assert page.get_attribute("#total", "data-votes") == str(len(votes))
                assert {v[:2] for v in votes} <= {("alpha", "beta"), ("beta", "alpha")}
                before = shown_board(page)
            with sqlite3.connect(db) as con:
                rows = con.execute(
                    "SELECT p.model_a, p.model_b, v.choice FROM votes v JOIN pairs p ON p.id = v.pair_id"
                )
                assert [(a, b, SCORE[c]) for a, b, c in rows] == votes

            with live_server(build_app(contenders, prompts, db, settings, seed=1, rounds=20)) as url:
                page = browser.new_page()
                page.goto(url + "/")
                page.locator('#total[data-votes="3"]').wait_for(timeout=20_000)
                assert shown_board(page) == before  # the old votes, read back from the file
                votes.append((*vote(page, "#vote-a"), 1.0))
                page.locator('#total[data-votes="4"]').wait_for(timeout=20_000)
                after = shown_board(page)
                board = httpx.get(f"{url}/api/leaderboard", timeout=30).json()
        finally:
            browser.close()
    expected = ratings.leaderboard(votes, ["alpha", "beta"], rounds=20)
    assert board == {"votes": 4, "models": expected}
    for row in expected:
        bt, interval, elo, *counts = after[row["model"]][1:]
        assert float(bt) == pytest.approx(row["bt"], abs=0.05) and float(elo) == pytest.approx(row["elo"], abs=0.05)
        assert counts == [str(row[k]) for k in ("votes", "wins", "losses", "ties")]
    winner = votes[-1][0]
    assert float(after[winner][3]) > float(before[winner][3])  # the last vote's winner gained Elo
