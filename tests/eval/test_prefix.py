"""Shared-prefix scoring equals scoring each continuation on its own with a plain forward pass, for every positional
scheme, with and without a prefix that all items of a batch share (and with that prefix's cache reused)."""

from __future__ import annotations

import pytest
import torch

from lmforge.eval.prefix import MIN_SHARED, PrefixScorer, batch_order
from lmforge.models import ModelConfig, build_model
from lmforge.models.layers import POSITIONS


def plain(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0].float(), dim=-1)[len(ctx) - 1 :]
    targets = torch.tensor(cont)
    return float(logprobs.gather(1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


@pytest.mark.parametrize("shared", [0, MIN_SHARED + 4])
@pytest.mark.parametrize("pos", sorted(POSITIONS))
def test_scores_equal_a_plain_forward_pass(pos, shared):
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=96)
    cfg.pos = pos
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)

    def ids(low: int, high: int) -> list[int]:
        return torch.randint(0, 300, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prefix = ids(shared, shared + 1)
    items = [(prefix + ids(1, 10), [ids(1, 6) for _ in range(4)]) for _ in range(3)]
    scorer = PrefixScorer(model)
    for batch in (items, items[::-1]):  # the second batch reuses the first one's prefix cache
        for (ctx, conts), scores in zip(batch, scorer.score(batch), strict=True):
            for cont, (lp, greedy) in zip(conts, scores, strict=True):
                ref_lp, ref_greedy = plain(model, ctx, cont)
                assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy
    assert (scorer.prefix is not None) == bool(shared)


def test_batch_order_keeps_contexts_with_the_same_few_shot_prefix_together():
    g = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 300, (n,), generator=g).tolist()

    shots, other = ids(100), ids(100)
    head = shots[:50]
    contexts = [head + other[50:] + ids(5) for _ in range(3)]  # like lm-eval's first items, whose examples differ
    contexts += [shots + ids(int(torch.randint(2, 40, (1,), generator=g))) for _ in range(20)] + [ids(60)]
    order = batch_order(contexts, batch_size=8)
    assert sorted(order) == list(range(len(contexts)))
    batches = [[contexts[i] for i in order[s : s + 8]] for s in range(0, len(order), 8)]
    for batch in batches[:2]:  # the 20 that share the examples fill two batches, longest first
        assert all(c[:100] == shots for c in batch) and [len(c) for c in batch] == sorted(map(len, batch))[::-1]
