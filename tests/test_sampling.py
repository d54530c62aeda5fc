"""Sampling below the stages: training imports nothing of serving; every accepted parameter samples without NaN; one
validation refuses the rest, naming the parameter."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.sampling import SamplingError, SamplingParams, penalized, sample_next, sampling_probs, seeded_generator

PACKAGE = Path(lmforge.__file__).parent


def _module_file(name: str) -> Path | None:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def _imports(name: str) -> set[str]:
    """The lmforge modules `name` imports anywhere in its source (function-level imports too), with their packages."""
    found = set()
    for node in ast.walk(ast.parse(_module_file(name).read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1) if parts[0] == "lmforge"}
    return {m for m in found if _module_file(m)}


def _reachable(roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        if (name := todo.pop()) not in seen:
            seen.add(name)
            todo += _imports(name)
    return seen


def test_training_and_sampling_import_nothing_from_serving():
    train = [f"lmforge.train.{p.stem}" for p in (PACKAGE / "train").glob("*.py") if p.stem != "__init__"]
    assert "lmforge.train.pretrain" in train
    for roots in (train, ["lmforge.sampling"]):
        serving = sorted(m for m in _reachable(roots) if m.startswith(("lmforge.serve", "lmforge.cpu")))
        assert not serving, f"{roots[0]}... reaches {serving}"
    assert "lmforge.sampling.generate" in _reachable(["lmforge.train.pretrain"])  # the check does follow imports


LOGITS = torch.tensor([[2.0, 5.0, -1.0, 4.999, 0.0]])


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 1e-320, 5e-324])
def test_tiny_temperatures_sample_the_argmax(temperature):
    probs = sampling_probs(LOGITS, temperature, 0, 1.0)
    assert torch.equal(probs, torch.nn.functional.one_hot(torch.tensor([1]), 5).float())
    assert int(sample_next(LOGITS, temperature, 0, 0.9, torch.Generator().manual_seed(0))) == 1


def test_temperature_still_follows_the_softmax_in_float64():
    probs = sampling_probs(LOGITS, 0.7, 0, 1.0)
    assert torch.allclose(probs, torch.softmax(LOGITS / 0.7, dim=-1), atol=1e-7)


@pytest.mark.parametrize("penalty", [1e-320, 1e-40, 1e300])
def test_extreme_repetition_penalties_keep_a_distribution(penalty):
    logits = torch.tensor([3.0, -2.0, 1.0, 0.5])
    params = SamplingParams(repetition_penalty=penalty, presence_penalty=1e30, frequency_penalty=-1e30)
    out = penalized(logits, [0, 1, 2, 2], 2, params)
    assert torch.isfinite(out).all()
    probs = sampling_probs(out[None], 1.0, 0, 1.0)
    assert torch.isfinite(probs).all() and float(probs.sum()) == pytest.approx(1.0)
    # with every logit clamped to float32's range the order CTRL's rule gives is kept where it is defined
    if penalty < 1:
        assert int(out.argmax()) == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", -0.1),
        ("temperature", 10**400),
        ("top_p", 0.0),
        ("top_p", math.nan),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", math.nan),
        ("frequency_penalty", -math.inf),
        ("max_tokens", -1),
        ("logprobs", -2),
        ("seed", 1.5),
        ("stop", [5]),
        ("stop_token_ids", ["x"]),
    ],
)
def test_validation_names_the_parameter(field, value):
    with pytest.raises(SamplingError, match=f"^{field}=") as caught:
        SamplingParams(**{field: value}).validate()
    assert caught.value.param == field


@pytest.mark.parametrize("seed", [2**64, 10**30, -(2**63) - 1, 2**64 - 1 + 15, -1])
def test_every_integer_seed_seeds_a_generator(seed):
    SamplingParams(seed=seed).validate()
    drawn = torch.rand(3, generator=seeded_generator(seed))
    assert torch.equal(drawn, torch.rand(3, generator=seeded_generator(seed % 2**64)))
    assert not torch.equal(drawn, torch.rand(3, generator=seeded_generator(seed + 1)))
