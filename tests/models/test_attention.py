"""Attention and its caches: the paged batch's steps equal a full forward (the contiguous cache's test is in
test_decoder.py), bidirectional and cross attention equal plain SDPA computed here, and the parameter names that
checkpoints and exports rely on stay as they are."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import from_dict
from lmforge.models import Attention, Cache, KVCache, ModelConfig, build_model
from lmforge.models.kv_cache import Chunk, PagedBatch, PagedKVStore
from lmforge.models.layers import alibi_slopes

VARIANTS = [
    dict(preset="llama-tiny"),
    dict(preset="gpt2-tiny"),
    dict(preset="llama-tiny", pos="alibi", n_kv_heads=2),
    dict(preset="gpt2-tiny", pos="rope", n_kv_heads=1),
]


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=48)
    return from_dict(ModelConfig, {**overrides, **base, "n_kv_heads": overrides.get("n_kv_heads", 4)})


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_paged_batch_steps_equal_a_full_forward(variant):
    # three sequences in scattered blocks of 4, as the engine runs them: prefills split into chunks, a prefill beside
    # decodes in one step, then decodes of all three together
    cfg = tiny(**variant)
    model = build_model(cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in (17, 14, 11)]
    order = torch.randperm(24, generator=gen).tolist()
    tables = [order[0:6], order[6:12], order[12:18]]
    store = PagedKVStore(cfg, num_blocks=24, block_size=4)
    steps = [[(0, 0, 7), (1, 0, 9)], [(0, 7, 13), (1, 9, 10), (2, 0, 6)]]  # (sequence, start, end)
    steps += [[(0, t + 3, t + 4), (1, t, t + 1), (2, t - 4, t - 3)] for t in range(10, 14)]
    got: list[list[torch.Tensor]] = [[], [], []]
    for step in steps:
        batch = PagedBatch(store, [Chunk(seqs[s][a:b], a, tables[s]) for s, a, b in step])
        assert isinstance(batch, Cache) and isinstance(KVCache(cfg, 1, 8), Cache)
        logits = model(batch.ids, cache=batch)[0]  # (N, V)
        for (s, _, _), rows in zip(step, logits.split([b - a for _, a, b in step]), strict=True):
            got[s].append(rows)
    for s, seq in enumerate(seqs):
        done = torch.cat(got[s])
        expected = model(torch.tensor([seq[: len(done)]]))[0]
        torch.testing.assert_close(done, expected, atol=1e-5, rtol=1e-5)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n, -1).transpose(1, 2)  # (B, n, T, D)


def reference(q, k, v, mask=None) -> torch.Tensor:
    """SDPA with the kv heads repeated for GQA, so it does not rely on the code path under test."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi"])
def test_bidirectional_attention_equals_sdpa_without_a_causal_mask(pos):
    cfg = tiny(preset="llama-tiny", pos=pos, n_kv_heads=2)
    positions = build_model(cfg, seed=0).positions
    torch.manual_seed(0)
    attn = Attention(cfg, causal=False).eval()
    x = torch.randn(2, 10, cfg.dim)
    B, T, C = x.shape
    p = torch.arange(T)
    q, k, v = attn.qkv(x).split([C, C // 2, C // 2], dim=-1)
    q, k = positions.rotate(heads(q, cfg.n_heads), heads(k, cfg.n_kv_heads), p)
    mask = None
    if pos == "alibi":  # symmetric: a key's distance either side costs the same
        mask = -alibi_slopes(cfg.n_heads)[:, None, None] * (p[None, :] - p[:, None]).abs().float()
    y = reference(q, k, heads(v, cfg.n_kv_heads), mask)
    expected = attn.proj(y.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x, positions, p), expected, atol=1e-5, rtol=1e-5)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(attn(changed, positions, p)[:, 0], attn(x, positions, p)[:, 0])  # sees the future


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_cross_attention_equals_sdpa_of_queries_over_the_memory(pos):
    cfg = tiny(preset="llama-tiny", pos=pos, n_kv_heads=2, bias=True)
    positions = build_model(cfg, seed=0).positions  # passed, and ignored: cross attention adds no position
    torch.manual_seed(0)
    attn = Attention(cfg, causal=False, cross=True).eval()
    x, memory = torch.randn(2, 5, cfg.dim), torch.randn(2, 11, cfg.dim)
    B, T, C = x.shape
    k, v = attn.kv(memory).split([C // 2, C // 2], dim=-1)
    y = reference(heads(attn.q(x), cfg.n_heads), heads(k, cfg.n_kv_heads), heads(v, cfg.n_kv_heads))
    expected = attn.proj(y.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x, positions, torch.arange(T), memory=memory), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_cannot_be_causal():
    with pytest.raises(ValueError, match="causal=False"):
        Attention(tiny(), causal=True, cross=True)


def test_parameter_names_are_the_ones_checkpoints_and_exports_use():
    def expected(layer_modules, extra):
        layers = {f"layers.{i}.{m}.{p}" for i in range(2) for m, params in layer_modules.items() for p in params}
        return {"embed.weight", "lm_head.weight", *layers, *extra}

    gpt2 = dict.fromkeys(("attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.up", "mlp.down"), ("weight", "bias"))
    want = expected(gpt2, ("positions.wpe.weight", "norm.weight", "norm.bias"))
    assert set(build_model(tiny(preset="gpt2-tiny")).state_dict()) == want
    llama = dict.fromkeys(("attn_norm", "attn.qkv", "attn.proj", "mlp_norm", "mlp.gate_up", "mlp.down"), ("weight",))
    assert set(build_model(tiny(preset="llama-tiny")).state_dict()) == expected(llama, ("norm.weight",))
