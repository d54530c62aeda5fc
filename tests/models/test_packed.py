"""Packed rows and soft prompts: an example's logits do not depend on what is packed beside it, and a soft prompt
equals feeding the same vectors as if they were token embeddings."""

import pytest
import torch

from lmforge.models import ModelConfig, build_model
from lmforge.models.layers import POSITIONS
from lmforge.models.packed import PackedRows, segment_positions


def test_segment_positions_restart_at_each_example():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("pos", list(POSITIONS))
def test_packed_example_logits_equal_the_example_alone(pos):
    cfg = ModelConfig(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32, pos=pos
    )
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 64, (1, n), generator=g) for n in (5, 7, 4))
    row = torch.cat([a, b, c], dim=1)  # (1, 16)
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4])
    with torch.no_grad():
        packed = model(row, cache=PackedRows(segments))
        for ex, start in ((a, 0), (b, 5), (c, 12)):
            alone = model(ex)
            torch.testing.assert_close(packed[:, start : start + ex.shape[1]], alone, atol=1e-5, rtol=1e-5)
        # and the neighbours matter without the packing cache (the test can fail)
        unmasked = model(row)
        assert (unmasked[:, 5:12] - model(b)).abs().max() > 1e-3


def test_packed_loss_ignores_minus_100_and_has_gradients():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=64, max_seq_len=16)
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 64, (2, 8))
    y = x.clone()
    y[:, :3] = -100
    loss = model(x, y, cache=PackedRows(torch.tensor([[0] * 4 + [1] * 4, [0] * 8])))
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad.abs().sum() > 0


def test_soft_prompt_equals_embedded_tokens():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=64, max_seq_len=32)
    model = build_model(cfg, seed=0).eval()
    prompt_ids = torch.tensor([[3, 9, 12]])
    idx = torch.tensor([[1, 2, 5, 7]])
    with torch.no_grad():
        full = model(torch.cat([prompt_ids, idx], dim=1))
        soft = model(idx, prompt=model.embed(prompt_ids))
    assert soft.shape == (1, 4, 64)
    torch.testing.assert_close(soft, full[:, 3:], atol=1e-5, rtol=1e-5)
