"""Adapters start as the identity and train only themselves; prompt tuning, P-tuning and prefix tuning keep packed
examples independent (an example's logits in a packed row equal its logits alone) and round-trip their weights."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.methods import PeftConfig, tune

X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def test_adapters_start_as_the_base_and_train_alone(make_base, randomize):
    base = make_base()
    with torch.no_grad():
        ref = base(X)
    tuned = tune(base, PeftConfig(method="adapter", adapter_dim=8))
    with torch.no_grad():
        assert torch.equal(tuned.logits(X), ref)  # the zero-initialised up projections add nothing
    names = list(tuned.trainable_state())
    assert len(names) == 2 * 2 * 4 and all(".down." in n or ".up." in n for n in names)  # 2 layers x 2 adapters
    randomize(tuned)
    with torch.no_grad():
        assert (tuned.logits(X) - ref).abs().max() > 1e-3
    tuned.loss(X, X).backward()
    assert all(p.grad is None for n, p in tuned.named_parameters() if not p.requires_grad)
    with pytest.raises(LmforgeError, match="load_trainable_state"):
        tuned.merged()


@pytest.mark.parametrize(
    "method", [dict(method="prompt"), dict(method="ptuning"), dict(method="prefix"), dict(method="prefix", pos="alibi")]
)
def test_packed_examples_see_the_virtual_tokens_alone(method, make_base, randomize):
    method = dict(method)
    pos = method.pop("pos", "rope")
    tuned = tune(make_base(pos=pos), PeftConfig(virtual_tokens=3, **method))
    randomize(tuned, std=0.02)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 256, (1, 4), generator=g), torch.randint(0, 256, (1, 6), generator=g)
    row, segments = torch.cat([a, b], dim=1), torch.tensor([[0] * 4 + [1] * 6])
    with torch.no_grad():
        packed = tuned.logits(row, segments)
        assert (packed[:, :4] - tuned.logits(a)).abs().max() < 1e-5
        if pos == "rope":  # ALiBi's distances to the virtual tokens are flat ones in a packed row (VirtualTokens)
            assert (packed[:, 4:] - tuned.logits(b)).abs().max() < 1e-5
        assert (tuned.loss(row, row, segments) - tuned.loss(row, row)).abs() > 1e-4  # packing did change something


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "adapter"])
def test_trainable_state_round_trips(method, make_base, randomize):
    cfg = PeftConfig(method=method, virtual_tokens=4, prefix_hidden=16 if method == "prefix" else 0)
    tuned = tune(make_base(), cfg)
    randomize(tuned)
    again = tune(make_base(), cfg)
    again.load_trainable_state({k: v.clone() for k, v in tuned.trainable_state().items()})
    with torch.no_grad():
        assert torch.equal(again.logits(X), tuned.logits(X))
    assert tuned.num_trainable()[0] == sum(v.numel() for v in tuned.trainable_state().values())


def test_prompt_training_lowers_the_loss(make_base):
    tuned = tune(make_base(), PeftConfig(method="prompt", virtual_tokens=4))
    opt = torch.optim.AdamW(tuned.param_groups(5e-2)[0]["params"], lr=5e-2)
    losses = []
    for _ in range(10):
        loss = tuned.loss(X[:, :-1], X[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
