"""The integer-weight C kernels (cpu/native.py qmatvec, qmatmul, layers over QuantLinear codes) against QuantLinear's
own torch forward, and the serving engine and batch-1 decode on int8 and int4 models against the torch path's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge import sampling
from lmforge.compress.modules import QuantLinear
from lmforge.compress.rtn import quantize_rtn, quantize_weight
from lmforge.cpu import native
from lmforge.cpu.allowlist import unsupported_reason
from lmforge.cpu.decode import _quantized
from lmforge.cpu.runner import CpuRunner, numpy_step
from lmforge.models import KVCache, ModelConfig, build_model
from lmforge.serve.engine import Engine, EngineConfig, SamplingParams
from lmforge.serve.generate import generate_tokens
from lmforge.tokenizer import Tokenizer, TokenizerConfig

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels are not built here")

# (bits, group_size, symmetric): int8 per channel as `lmforge compress method=int8` writes it, int4 per group, and
# groups that the kernels' vector paths cannot take whole (16; per channel over 96 inputs)
FORMATS = [(8, 0, True), (8, 0, False), (8, 32, False), (4, 32, True), (4, 64, False), (4, 128, True), (4, 16, True)]


def quant_linear(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> QuantLinear:
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(out_features))
    return QuantLinear.from_codes(*quantize_weight(w, bits, group_size, symmetric), bits)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_integer_products_match_quantlinear(fmt, threads):
    bits, group_size, symmetric = fmt
    for out_features, in_features in [(7, 128), (97, 256), (130, 384 if group_size != 16 else 96)]:
        layer = quant_linear(out_features, in_features, bits, group_size, symmetric)
        weight = _quantized(layer)
        matvec, matmul = native.qmatvec(weight, threads), native.qmatmul(weight, threads)
        for rows in (1, 3, 7, 13):
            x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
            expected = layer(x.double()).numpy()  # the dequantized weight, in float64
            close(matmul(x.numpy()), expected, native.rounds_activations(weight, rows))
            close(matvec(x[0].numpy()), expected[0], native.rounds_activations(weight, 1))


def close(got: np.ndarray, expected: np.ndarray, rounds: bool) -> None:
    """Rounding x to int8 in blocks of 32 (llama.cpp's Q8_0 activations) moves a product by ~1% of its size; without
    it the sums differ only by their order."""
    if rounds:
        assert np.linalg.norm(got - expected) < 2e-2 * np.linalg.norm(expected)
    else:
        tolerance = 2e-6 * np.abs(expected).max() * expected.shape[-1] ** 0.5
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


TINY = dict(vocab_size=263, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)  # all layers in one call
GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)  # a kernel call per product
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([], 263, TokenizerConfig(kind="byte"))


def quantized_model(bits: int, group_size: int, symmetric: bool, head: bool, init_std: float = 0.5, style=LLAMA):
    model = build_model(ModelConfig(**TINY, **style, init_std=init_std), seed=0).eval()
    quantize_rtn(model, bits, group_size, symmetric, head)
    return model


# bits, group_size, symmetric, head, the model's style
CASES = [(8, 0, True, True, LLAMA), (4, 32, True, False, LLAMA), (4, 64, False, True, LLAMA), (8, 0, False, True, GPT2)]


@pytest.mark.parametrize("bits, group_size, symmetric, head, style", CASES)
def test_the_engine_gives_the_torch_tokens(tokenizer, bits, group_size, symmetric, head, style):
    """With VNNI the engine's products round activations (see the batch-1 test), which can flip a near tie of this
    random model: its tokens must be torch's up to a token whose lead over the runner-up is under 3% of the logits'
    spread (the flips seen here came at 0.5-1.6%; init_std 0.1 keeps the model from amplifying the rounding)."""
    model, eos = quantized_model(bits, group_size, symmetric, head, 0.1, style), tokenizer.eos_id
    assert unsupported_reason(model) is None
    gen = torch.Generator().manual_seed(bits)
    batch = [[1, *torch.randint(7, 200, (n,), generator=gen).tolist()] for n in (1, 19)]
    expected = [list(sampling.generate_tokens(model, p, GREEDY.max_tokens, stop_ids={eos})) for p in batch]
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_batched_tokens=9))
    assert isinstance(engine.runner, CpuRunner)
    rounds = native.rounds_activations(_quantized(model.layers[0].attn.qkv), 2)
    for prompt, want, out in zip(batch, expected, engine.generate(batch, GREEDY), strict=True):
        differ = next((i for i, (a, b) in enumerate(zip(out.token_ids, want, strict=True)) if a != b), None)
        assert differ is None or (rounds and leads(model, prompt, want)[differ] < 0.03)


@torch.inference_mode()
def leads(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """Per greedy token of the torch model, its lead over the runner-up, in standard deviations of the logits."""
    logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]  # (len(tokens), V)
    top2 = logits.topk(2).values
    return ((top2[:, 0] - top2[:, 1]) / logits.std(dim=-1)).tolist()


@pytest.mark.parametrize("bits, group_size, symmetric, head, style", CASES)
def test_batch1_decode_follows_the_torch_logits(bits, group_size, symmetric, head, style):
    """Batch-1 steps may round activations to int8 (native.rounds_activations, as llama.cpp's Q8_0 does): a random
    model's near ties can then flip a greedy token, so the steps are checked on the torch model's own tokens: logits
    within 5% (as a norm; 1e-5 without rounding) and the torch token wherever its lead over the runner-up exceeds twice
    the largest error. init_std 0.1: at 0.5 the random layers amplify the rounding to ~20% of the logits."""
    model = quantized_model(bits, group_size, symmetric, head, 0.1, style)
    rounds = native.rounds_activations(_quantized(model.layers[0].attn.qkv), 1)
    prompt = [1, 40, 41, 42, 43]
    tokens = list(sampling.generate_tokens(model, prompt, GREEDY.max_tokens))
    cache = KVCache(model.cfg, 1, len(prompt) + len(tokens))
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache, last_only=True)
        step = numpy_step(model, cache)
        for i, token in enumerate(tokens[:-1]):
            got = torch.from_numpy(step(token).copy())
            want = model(torch.tensor([prompt + tokens[: i + 1]]))[0, -1]
            assert (got - want).norm() <= (5e-2 if rounds else 1e-5) * want.norm()
            error = (got - want).abs().max()
            top2 = want.topk(2).values
            if top2[0] - top2[1] > 2 * error:
                assert int(got.argmax()) == tokens[i + 1]
    if not rounds:  # the same sums in another order: the same tokens
        assert list(generate_tokens(model, prompt, GREEDY.max_tokens, backend="numpy")) == tokens


def test_the_allowlist_takes_quantlinear_only_with_the_kernels(monkeypatch):
    model = quantized_model(8, 0, True, False)
    assert unsupported_reason(model) is None

    class Other(QuantLinear):  # a subclass may compute something else
        pass

    down = model.layers[0].mlp.down
    model.layers[0].mlp.down = Other(down.in_features, down.out_features, 8, 0)
    assert "Other" in unsupported_reason(model)
    model.layers[0].mlp.down = down
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert "C kernels" in unsupported_reason(model)
    finally:
        monkeypatch.delenv("LMFORGE_NATIVE")
        native._library.cache_clear()
