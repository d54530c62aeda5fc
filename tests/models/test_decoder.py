"""Decoder invariants: cached decode equals a full forward, causality, attention against a plain reference,
parameter counts against the published sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import from_dict
from lmforge.errors import LmforgeError
from lmforge.models import KVCache, ModelConfig, build_model
from lmforge.models.layers import alibi_slopes

VARIANTS = [
    dict(preset="llama-tiny"),
    dict(preset="gpt2-tiny"),
    dict(preset="llama-tiny", pos="alibi"),
    dict(preset="llama-tiny", pos="sinusoidal", n_kv_heads=1),
    dict(preset="gpt2-tiny", pos="rope", n_kv_heads=2),
]


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=48)
    return from_dict(ModelConfig, {**overrides, **base, "n_kv_heads": overrides.get("n_kv_heads", 4)})


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_cached_decode_equals_full_forward(variant):
    cfg = tiny(**variant)
    model = build_model(cfg, seed=0).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = KVCache(cfg, batch_size=2, max_len=cfg.max_seq_len)
    pieces = [model(idx[:, :11], cache=cache), model(idx[:, 11:17], cache=cache)]
    pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(17, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_future_tokens_do_not_change_past_logits(variant):
    cfg = tiny(**variant)
    model = build_model(cfg, seed=0).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(idx)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(idx)[:, 12:], model(changed)[:, 12:])


def reference_attention(q, k, v, bias):
    """Plain softmax(q k^T / sqrt(d) + bias) v with k, v repeated for GQA."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned"])
def test_attention_matches_plain_reference(pos):
    cfg = tiny(preset="llama-tiny", pos=pos, n_kv_heads=2)
    model = build_model(cfg, seed=0).eval()
    attn, positions = model.layers[0].attn, model.positions
    x = torch.randn(2, 16, cfg.dim)
    B, T, C = x.shape
    qkv = attn.qkv(x).view(B, T, -1, cfg.head_dim).transpose(1, 2)
    q, k, v = qkv.split([cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads], dim=1)
    p = torch.arange(T)
    if pos == "rope":  # rotation as a complex product on (i, i + D/2) pairs, the HF LLaMA layout
        half = cfg.head_dim // 2
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(half) / half)
        rot = torch.polar(torch.ones(T, half), torch.outer(p.float(), freqs))

        def rotate(t):
            c = torch.complex(t[..., :half], t[..., half:]) * rot
            return torch.cat([c.real, c.imag], dim=-1)

        q, k = rotate(q), rotate(k)
    causal = torch.full((T, T), float("-inf")).triu(1)
    bias = causal
    if pos == "alibi":
        slopes = alibi_slopes(cfg.n_heads)[:, None, None]
        bias = causal + slopes * (p[None, :] - p[:, None]).clamp(max=0).float()
    expected = attn.proj(reference_attention(q, k, v, bias).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x, positions, p, None), expected, atol=1e-5, rtol=1e-5)


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert len(alibi_slopes(6)) == 6


@pytest.mark.parametrize(
    "preset, expected",
    [("gpt2-124m", 124_439_808), ("llama-1b", 1_235_814_400)],  # HF GPT2LMHeadModel; Llama 3.2 1B model card
)
def test_parameter_counts_of_real_shapes(preset, expected):
    assert from_dict(ModelConfig, {"preset": preset}).num_params() == expected


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_built_model_has_the_counted_parameters(variant):
    cfg = tiny(**variant)
    assert build_model(cfg).num_params() == cfg.num_params()


def test_init_is_documented_scale_and_tied():
    cfg = from_dict(ModelConfig, {"preset": "gpt2-tiny", "vocab_size": 512})
    model = build_model(cfg, seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = model.layers[0].mlp.down.weight.std().item()
    assert scaled == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layers), rel=0.05)
    assert torch.all(model.layers[0].attn.qkv.bias == 0)


def test_loss_is_cross_entropy_of_logits_and_ignores_minus_100():
    cfg = tiny(preset="llama-tiny")
    model = build_model(cfg, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    targets = torch.randint(0, cfg.vocab_size, (2, 10))
    targets[0, :4] = -100
    logits = model(idx)
    expected = F.cross_entropy(logits.view(-1, cfg.vocab_size), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(model(idx, targets), expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=30, n_heads=4), "must divide model.dim"),
        (dict(n_kv_heads=3), "must divide model.n_heads"),
        (dict(pos="nope"), "choose one of learned, sinusoidal, rope, alibi"),
        (dict(preset="gpt5"), "not a preset"),
        (dict(dropout=1.5), "dropout"),
        (dict(n_layers=0), "must be positive"),
    ],
)
def test_impossible_configs_are_rejected_with_the_key(overrides, message):
    with pytest.raises(LmforgeError, match=message):
        from_dict(ModelConfig, overrides)
