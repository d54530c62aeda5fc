"""The numpy decode steps, with the C kernels (cpu/native.py) and without: the same logits as the torch model's cached
decode for every combination of the model's position, norm and MLP tables (a new entry is covered here unedited) and
both weight layouts, over one shared KV cache, the same greedy tokens through generate_tokens, and the torch path
wherever the CPU runner's allowlist does not admit the model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lmforge.cpu import native
from lmforge.cpu.allowlist import unsupported_reason
from lmforge.cpu.decode import CacheKV, NumpyDecoder, PagedKV
from lmforge.errors import LmforgeError
from lmforge.models import KVCache, ModelConfig, build_model
from lmforge.models.layers import MLPS, NORMS, POSITIONS
from lmforge.serve.generate import generate_tokens, prepare_for_decode
from lmforge.serve.offload import stream_layers
from lmforge.serve.paged import Chunk, PagedBatch, PagedKVStore

TINY = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=48)
# every entry of the position, norm and MLP tables with every other; biases, tied embeddings and GQA/MQA/MHA cycle
VARIANTS = {
    f"{pos}-{norm}-{mlp}": dict(
        pos=pos, norm=norm, mlp=mlp, bias=i // 2 % 2 == 1, tie_embeddings=i % 3 == 0, n_kv_heads=(2, 1, 4)[i % 3]
    )
    for i, (pos, norm, mlp) in enumerate(itertools.product(POSITIONS, NORMS, MLPS))
}
# 6 heads: ALiBi's interleaved slopes for a head count that is not a power of two, 3 query heads per kv head
VARIANTS["alibi-6-heads"] = dict(pos="alibi", norm="layernorm", mlp="gelu", bias=False, dim=48, n_heads=6, n_kv_heads=2)
LLAMA = "rope-rmsnorm-swiglu"
# each variant in one weight layout, alternating: both layouts meet every table entry across the variants
LAYOUTS = [(v, ("row-major", "column-major")[i % 2]) for i, v in enumerate(sorted(VARIANTS))]
PROMPT = [3, 14, 15, 92, 65]


def test_the_variants_cover_the_tables_and_the_one_call_layers():
    assert {v["pos"] for v in VARIANTS.values()} == set(POSITIONS)
    assert {v["norm"] for v in VARIANTS.values()} == set(NORMS)
    assert {v["mlp"] for v in VARIANTS.values()} == set(MLPS)
    assert any(one_call_layers(v) for v in VARIANTS)


def one_call_layers(variant: str) -> bool:
    """Whether NumpyDecoder runs all layers in one kernel call (Llama-style layers)."""
    v = VARIANTS[variant]
    return v["norm"] == "rmsnorm" and v["mlp"] == "swiglu" and not v["bias"]


def torch_only(model) -> bool:
    """A variant the CPU allowlist does not take runs through torch, whatever asks for it: that is its check."""
    if unsupported_reason(model) is None:
        return False
    with pytest.raises(LmforgeError, match="backend='numpy' cannot decode"):
        generate_tokens(model, PROMPT, 2, backend="numpy")
    return True


def tiny_model(variant: str, prepared: bool = False):
    # a larger init spreads the logits so greedy picks are not near-ties that rounding could flip
    model = build_model(ModelConfig(**{**TINY, **VARIANTS[variant]}, init_std=0.5), seed=0).eval()
    return prepare_for_decode(model) if prepared else model


def column_major(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


@pytest.fixture(params=["c", "numpy"])
def kernels(request):
    """Both decoders: with the C kernels built on this machine, and numpy alone (as without a C compiler)."""
    if request.param == "numpy":
        request.getfixturevalue("numpy_only")
    else:
        assert native.available(), "make test needs a C compiler with OpenMP"
    return request.param


@pytest.mark.parametrize(("variant", "layout"), LAYOUTS)
@torch.inference_mode()
def test_numpy_steps_equal_torch_cached_decode(variant, layout, kernels):
    model = tiny_model(variant)
    if torch_only(model):
        return
    if layout == "column-major":  # the C matrix-product kernel's layout (OpenBLAS's without the kernels)
        column_major(model)
    reference, shared = KVCache(model.cfg, 1, 16), KVCache(model.cfg, 1, 16)
    for cache in (reference, shared):
        model(torch.tensor([PROMPT]), cache=cache)  # the torch prefill fills both caches
    decoder, kv = NumpyDecoder(model), CacheKV(shared)

    def numpy_step(token: int) -> np.ndarray:
        logits = decoder.step(token, shared.pos, kv)
        shared.advance(1)
        return logits

    token = 7
    for step in range(8):
        expected = model(torch.tensor([[token]]), cache=reference)[0, -1]  # (V,)
        # numpy and torch take turns on one cache: each must read the keys and values the other wrote
        got = numpy_step(token) if step % 3 != 2 else model(torch.tensor([[token]]), cache=shared)[0, -1].numpy()
        assert got.dtype == np.float32 and got.shape == (model.cfg.vocab_size,)
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
        assert shared.pos == reference.pos
        token = int(expected.argmax())


@pytest.mark.parametrize(("variant", "layout"), LAYOUTS)
@torch.inference_mode()
def test_engine_steps_in_numpy_equal_the_packed_torch_step(variant, layout):
    # two engine steps over blocks scattered in one pool: prompt chunks (one after 4 cached tokens, with every row's
    # logits) beside a decode, then three decodes; NumpyDecoder.forward (C kernels over packed copies of the weights;
    # Llama's layers in one call) against the model's own forward over PagedBatch
    model = tiny_model(variant)
    if torch_only(model):
        return
    if layout == "column-major":
        column_major(model)
    decoder = NumpyDecoder(model, batched=True)
    assert (decoder.all_layers is not None) == one_call_layers(variant)
    tables = [[0, 5, 2, 8], [7, 1, 9], [3, 6, 4]]
    steps = [
        ([Chunk([1, 2, 3, 4], 0, tables[0]), Chunk([9] * 7, 0, tables[1]), Chunk([5, 6, 7], 0, tables[2])], None),
        ([Chunk([11, 12, 13, 14, 15, 16], 4, tables[0]), Chunk([8], 7, tables[1])], [True, False]),
        ([Chunk([21], 10, tables[0]), Chunk([22], 8, tables[1]), Chunk([23], 3, tables[2])], None),
    ]
    stores = [PagedKVStore(model.cfg, num_blocks=10, block_size=4) for _ in range(2)]
    pools = native.pools(stores[0].k.numpy(), stores[0].v.numpy())
    for chunks, every in steps:
        every = every or [False] * len(chunks)
        got = decoder.forward(chunks, pools, 4, every)
        batch = PagedBatch(stores[1], chunks)
        hidden = model.hidden_states(batch.ids, batch)[0]
        first = 0
        for chunk, rows, all_rows in zip(chunks, got, every, strict=True):
            n = len(chunk.tokens)
            expected = model.lm_head(model.norm(hidden[first : first + n] if all_rows else hidden[first + n - 1 :][:1]))
            assert rows.shape == (n if all_rows else 1, model.cfg.vocab_size)
            np.testing.assert_allclose(rows, expected.numpy(), rtol=0, atol=1e-4)
            first += n
    torch.testing.assert_close(stores[0].k, stores[1].k, rtol=1e-4, atol=1e-4)  # the same keys written where they go


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generate_tokens_same_with_both_backends(variant, kernels):
    model = tiny_model(variant, prepared=True)
    if torch_only(model):
        return
    numpy_ids = list(generate_tokens(model, PROMPT, 30, backend="numpy"))
    assert numpy_ids == list(generate_tokens(model, PROMPT, 30, backend="torch"))
    assert numpy_ids == list(generate_tokens(model, PROMPT, 30))  # auto picks numpy here
    assert len(numpy_ids) == 30


def test_sampling_is_seeded_on_both_backends():
    model = tiny_model(LLAMA)
    kw = dict(temperature=1.0, top_p=0.9, seed=3)
    sampled = list(generate_tokens(model, PROMPT, 20, backend="numpy", **kw))
    assert sampled == list(generate_tokens(model, PROMPT, 20, backend="numpy", **kw))
    assert sampled == list(generate_tokens(model, PROMPT, 20, backend="torch", **kw))


def test_bf16_model_falls_back_to_torch_and_numpy_says_why():
    model = tiny_model(LLAMA).to(torch.bfloat16)
    assert len(list(generate_tokens(model, PROMPT, 4))) == 4  # auto: the torch path
    with pytest.raises(LmforgeError, match="not all fp32 on the CPU.*model.float"):
        generate_tokens(model, PROMPT, 4, backend="numpy")
    with pytest.raises(LmforgeError, match="backend='jax' is not one of auto, numpy, torch"):
        generate_tokens(model, PROMPT, 4, backend="jax")


def test_streamed_model_keeps_the_torch_path():
    model = tiny_model(LLAMA)
    expected = list(generate_tokens(model, PROMPT, 12, backend="torch"))
    stream_layers(model, resident_layers=1)  # layer 1's weights now live outside the module between passes
    assert list(generate_tokens(model, PROMPT, 12)) == expected
    with pytest.raises(LmforgeError, match="forward hooks"):
        generate_tokens(model, PROMPT, 12, backend="numpy")


@pytest.mark.parametrize("table", [[2, 3, 4], [5, 1, 3]])
def test_paged_reads_are_the_blocks_in_table_order(table):
    # consecutive blocks are read through a view, others gathered: both give positions [0, length) in order
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)
    store = PagedKVStore(cfg, num_blocks=6, block_size=4)
    store.k.normal_(generator=torch.Generator().manual_seed(0))
    store.v.normal_(generator=torch.Generator().manual_seed(1))
    kv = PagedKV(store, table)
    keys, values = kv.read(1, 10)
    expected = torch.cat([store.k[1, :, b] for b in table], dim=1)[:, :10]  # (Hkv, S, D)
    np.testing.assert_array_equal(keys, expected.numpy())
    np.testing.assert_array_equal(values, torch.cat([store.v[1, :, b] for b in table], dim=1)[:, :10].numpy())
    kv.write(1, 9, np.ones((2, 8), np.float32), np.zeros((2, 8), np.float32))  # position 9: block table[2], slot 1
    assert store.k[1, :, table[2], 1].eq(1).all() and store.v[1, :, table[2], 1].eq(0).all()
