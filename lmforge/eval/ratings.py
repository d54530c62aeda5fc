"""Ratings from pairwise votes: online Elo, Bradley-Terry by penalised maximum likelihood, and bootstrap intervals
(Bradley & Terry, 1952; Chiang et al., 2024, "Chatbot Arena"), on the Elo scale: 1000 + 400 * log10(odds).

A vote is (model_a, model_b, score_a) with score_a 1 (A won), 0 (B won) or 0.5 (a tie).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Vote = tuple[str, str, float]
BASE_RATING = 1000.0
ELO_K = 4.0
"""Chatbot Arena's K: with hundreds of votes a model's rating moves little per vote, so the order votes came in
matters little; 32 (chess's) makes the last few votes dominate."""
BT_ALPHA = 0.01
"""The L2 penalty alpha * |theta|^2 (a Gaussian prior of variance 1 / (2 alpha) on the log-strengths): it keeps the
fit finite when a model has won or lost every one of its votes, as happens early on."""
SCALE = 400.0 / math.log(10.0)
"""Log-strength (natural log odds) to Elo points: 400 points are odds of 10 to 1."""


def elo(votes: Sequence[Vote], models: Sequence[str], k: float = ELO_K) -> dict[str, float]:
    """Online Elo over the votes in the order given; every model starts at BASE_RATING, a tie scores 0.5."""
    rating = dict.fromkeys(models, BASE_RATING)
    for a, b, score_a in votes:
        expected_a = 1.0 / (1.0 + 10.0 ** ((rating[b] - rating[a]) / 400.0))
        rating[a] += k * (score_a - expected_a)
        rating[b] -= k * (score_a - expected_a)
    return rating


def win_matrix(votes: Sequence[Vote], models: Sequence[str]) -> np.ndarray:
    """wins[i, j]: how often model i beat model j, a tie counting half a win each way."""
    index = {m: i for i, m in enumerate(models)}
    wins = np.zeros((len(models), len(models)))
    for a, b, score_a in votes:
        wins[index[a], index[b]] += score_a
        wins[index[b], index[a]] += 1.0 - score_a
    return wins


def bradley_terry(wins: np.ndarray, alpha: float = BT_ALPHA, tol: float = 1e-12) -> np.ndarray:
    """Log-strengths theta minimising sum_ij wins[i, j] * log(1 + exp(theta_j - theta_i)) + alpha * |theta|^2, the
    objective of choix.opt_pairwise (which takes whole wins: give it each decisive vote twice, each tie once each way,
    and 2 * alpha). The penalty makes the minimum unique and its mean zero. Newton's method with a backtracking line
    search: the objective is strictly convex, and a few steps reach `tol`."""
    assert alpha > 0, "without the penalty the fit is not unique (and not finite for an unbeaten model)"
    n = len(wins)
    games = wins + wins.T

    def objective(theta: np.ndarray) -> float:
        return float(np.sum(wins * np.logaddexp(0.0, theta[None, :] - theta[:, None])) + alpha * theta @ theta)

    theta = np.zeros(n)
    value = objective(theta)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # p[i, j]: chance that i beats j
        grad = (wins.T * p).sum(1) - (wins * (1.0 - p)).sum(1) + 2.0 * alpha * theta
        weight = games * p * (1.0 - p)
        hessian = np.diag(weight.sum(1) + 2.0 * alpha) - weight
        step = np.linalg.solve(hessian, grad)
        size = 1.0
        while (new := objective(theta - size * step)) > value and size > 1e-8:
            size /= 2
        theta, value = theta - size * step, new
        if np.max(np.abs(size * step)) < tol:
            break
    return theta


def bt_ratings(votes: Sequence[Vote], models: Sequence[str], alpha: float = BT_ALPHA) -> dict[str, float]:
    """Bradley-Terry ratings on the Elo scale: BASE_RATING + SCALE * theta (theta has mean zero)."""
    theta = bradley_terry(win_matrix(votes, models), alpha)
    return {m: BASE_RATING + SCALE * t for m, t in zip(models, theta, strict=True)}


def bootstrap(
    votes: Sequence[Vote], models: Sequence[str], rounds: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the Bradley-Terry ratings over `rounds` resamples of the votes (with replacement)."""
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    for r in range(rounds):
        picked = [votes[i] for i in rng.integers(0, len(votes), len(votes))] if votes else []
        samples[r] = list(bt_ratings(picked, models).values())
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return {m: (float(lo), float(hi)) for m, lo, hi in zip(models, low, high, strict=True)}


def leaderboard(votes: Sequence[Vote], models: Sequence[str], rounds: int = 200, seed: int = 0) -> list[dict]:
    """One row per model, best Bradley-Terry rating first: both ratings, the interval, and the vote counts."""
    models = list(dict.fromkeys([*models, *(m for a, b, _ in votes for m in (a, b))]))
    elo_now, bt, interval = elo(votes, models), bt_ratings(votes, models), bootstrap(votes, models, rounds, seed)
    rows = []
    for m in models:
        scores = [s if a == m else 1.0 - s for a, b, s in votes if m in (a, b)]
        rows.append({
            "model": m, "bt": float(bt[m]), "bt_low": interval[m][0], "bt_high": interval[m][1], "elo": elo_now[m],
            "votes": len(scores), "wins": scores.count(1.0), "losses": scores.count(0.0), "ties": scores.count(0.5),
        })  # fmt: skip
    return sorted(rows, key=lambda row: -row["bt"])
