"""The C decode kernels (cpu/native.py) against float64 numpy references, on one thread and on two, over the
decoder's own caches (CacheKV, paged blocks in any order, several sequences' chunks at once), and how they are built:
cached by hash, nothing half-written, and None (numpy fallback) when no compiler works."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lmforge.cpu import decode, native
from lmforge.cpu.decode import CacheKV, PagedKV, _RotaryPositions
from lmforge.models import KVCache, ModelConfig, build_model
from lmforge.models.layers import POSITIONS
from lmforge.serve.paged import Chunk, PagedBatch, PagedKVStore

RNG = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (97, 32), (384, 1152), (1000, 17)])
def test_gemv_matches_numpy(shape, threads):
    w, x = randn(*shape), randn(shape[1])
    got = native.matvec(w, threads)(x)
    assert got.dtype == np.float32 and got.shape == (shape[0],)
    np.testing.assert_allclose(got, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-4)


def test_gemv_reads_strided_rows_and_vector_views():
    w, qkv = randn(64, 40), randn(90)
    rows, x = w[::3, :30], qkv[10:40]  # every third row, a slice of each; a contiguous view of a longer vector
    np.testing.assert_allclose(native.matvec(rows, 2)(x), rows.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 33])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (32, 97), (384, 1152), (100, 16), (17, 200)])
def test_matmul_matches_numpy(shape, rows, threads):
    # every path: one row, tiles of 1-6 rows, panels of 4 vectors and of one, columns right of the last vector
    w_t, x = randn(*shape), randn(rows, shape[0])
    got = native.matmul(w_t, threads)(x)
    assert got.dtype == np.float32 and got.shape == (rows, shape[1])
    np.testing.assert_allclose(got, x.astype(np.float64) @ w_t, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(native.matmul(w_t, threads)(x[0]), got[0], rtol=1e-5, atol=1e-4)  # a vector: a row


def test_matmul_reads_strided_rows_and_weight_views():
    w_t, x = randn(40, 70), randn(9, 90)
    columns, rows = w_t[:30, 5:69], x[::2, 10:40]  # a slice of a wider weight; every other row of a wider input
    np.testing.assert_allclose(native.matmul(columns, 2)(rows), rows.astype(np.float64) @ columns, rtol=1e-5, atol=1e-5)
    apart = w_t[:30, ::2]  # every other column: packing copies any layout
    np.testing.assert_allclose(native.matmul(apart, 2)(rows), rows @ apart.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_reused_output_is_overwritten_by_the_next_call():
    w, x1, x2 = randn(8, 5), randn(5), randn(5)
    fresh, reused = native.matvec(w, 1), native.matvec(w, 1, reuse_output=True)
    a, b = fresh(x1), fresh(x2)
    assert not np.shares_memory(a, b) and not np.allclose(a, b)
    first = reused(x1)
    np.testing.assert_allclose(first, a, rtol=1e-6)
    assert np.shares_memory(reused(x2), first)  # the same memory, now holding W x2
    np.testing.assert_allclose(first, b, rtol=1e-6)
    products = native.matmul(w.T.copy(), 1, reuse_output=True)
    three = products(np.stack([x1, x2, x1]))
    np.testing.assert_allclose(three, np.stack([a, b, a]), rtol=1e-6)
    two = products(np.stack([x2, x1]))  # fewer rows: the first rows of the same buffer
    assert two.shape == (2, 8) and np.shares_memory(two, three)
    np.testing.assert_allclose(three[:2], np.stack([b, a]), rtol=1e-6)
    four = products(np.stack([x1, x1, x2, x2]))  # more rows than ever: a larger buffer, the old one left alone
    assert four.shape == (4, 8) and not np.shares_memory(four, three)
    np.testing.assert_allclose(three[:2], np.stack([b, a]), rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 70])
def test_silu_mul_and_rmsnorm_match_numpy(rows):
    # 70 x 1000 elements: past the size where the rows are split over the threads
    gu = randn(rows, 2000) * 20  # gates far into both tails: e^-g must neither overflow nor lose the sign
    gate, up = gu[:, :1000].astype(np.float64), gu[:, 1000:]
    expected = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(native.silu_mul(1000, 2)(gu), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(native.silu_mul(1000, 2)(gu[0]), expected[0], rtol=1e-5, atol=1e-4)  # a vector
    x, w = randn(rows, 1000) * 3, randn(1000)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(native.rmsnorm(w, 1e-5, 2)(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(native.rmsnorm(w, 1e-5, 1)(x[-1]), expected[-1], rtol=1e-5, atol=1e-5)


def reference_attention(q, keys, values, positions, slopes=None):
    """q (T, Hq, D) at these positions; keys and values (Hkv, S, D) -> (T, Hq * D) in float64: each query attends
    causally up to its own position, softmax(q k / sqrt(D) + ALiBi bias) v."""
    T, Hq, D = q.shape
    Hkv = keys.shape[0]
    out = np.zeros((T, Hq, D))
    for t, pos in enumerate(positions):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            scores = keys[g, : pos + 1].astype(np.float64) @ q[t, h] / np.sqrt(D)
            if slopes is not None:
                scores += slopes[h] * (np.arange(pos + 1) - pos)
            p = np.exp(scores - scores.max())
            out[t, h] = p / p.sum() @ values[g, : pos + 1]
    return out.reshape(T, Hq * D)


def rope_rotate(x, cos, sin):
    """HF LLaMA's half-split rotation of x (..., D) by the cos and sin rows of its position (..., D)."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def config(Hq: int, Hkv: int, D: int, pos: str = "learned") -> ModelConfig:
    return ModelConfig(vocab_size=8, dim=Hq * D, n_layers=2, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8, pos=pos)


def split_qkv(qkv, Hq, Hkv, D):
    """(T, (Hq + 2 Hkv) D) -> q (T, Hq, D), k and v (T, Hkv, D)."""
    T = qkv.shape[0]
    return (
        qkv[:, : Hq * D].reshape(T, Hq, D),
        qkv[:, Hq * D : (Hq + Hkv) * D].reshape(T, Hkv, D),
        qkv[:, (Hq + Hkv) * D :].reshape(T, Hkv, D),
    )


def filled_cache(Hq, Hkv, D, length, pos="learned"):
    cache = KVCache(config(Hq, Hkv, D, pos), 1, length)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    return CacheKV(cache)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("Hq", "Hkv", "S"), [(4, 4, 1), (4, 2, 9), (6, 2, 33), (8, 1, 300)])
def test_attention_writes_the_newest_kv_and_attends_over_the_cache(Hq, Hkv, S, threads):
    D, layer = 16, 1
    kv, qkv = filled_cache(Hq, Hkv, D, 512), randn((Hq + 2 * Hkv) * D)
    kv.chunks.advance_to(S)
    got = native.attention(Hq, Hkv, D, None, None, threads)(qkv, kv.pools[layer], kv.chunks)
    assert got.shape == (Hq * D,)  # a vector in, a vector out
    q, k_new, v_new = split_qkv(qkv[None], Hq, Hkv, D)
    np.testing.assert_array_equal(kv.k[layer, :, S - 1], k_new[0])  # written at position S - 1 of this layer only
    np.testing.assert_array_equal(kv.v[layer, :, S - 1], v_new[0])
    assert not np.array_equal(kv.k[0, :, S - 1], k_new[0])
    keys, values = kv.read(layer, S)
    np.testing.assert_allclose(got, reference_attention(q, keys, values, [S - 1])[0], rtol=1e-4, atol=1e-5)


def test_attention_rotates_q_and_k_by_rope():
    Hq, Hkv, D, S = 4, 2, 16, 12
    positions = _RotaryPositions(build_model(config(Hq, Hkv, D, pos="rope"), seed=0).positions)
    kv, qkv = filled_cache(Hq, Hkv, D, 32), randn((Hq + 2 * Hkv) * D)
    kv.chunks.advance_to(S)
    got = native.attention(Hq, Hkv, D, None, positions.tables, 2)(qkv, kv.pools[0], kv.chunks)
    cos, sin = positions.cos[S - 1], positions.sin[S - 1]
    q, k_new, _ = split_qkv(qkv[None], Hq, Hkv, D)
    np.testing.assert_allclose(kv.k[0, :, S - 1], rope_rotate(k_new[0], cos, sin), rtol=1e-5, atol=1e-6)
    keys, values = kv.read(0, S)
    expected = reference_attention(rope_rotate(q, cos, sin), keys, values, [S - 1])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_adds_alibi_bias():
    Hq, Hkv, D, S = 6, 3, 8, 20
    kv, qkv = filled_cache(Hq, Hkv, D, 32), randn((Hq + 2 * Hkv) * D)
    kv.chunks.advance_to(S)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625, 0.7, 0.35], np.float32)
    got = native.attention(Hq, Hkv, D, slopes, None, 2)(qkv, kv.pools[0], kv.chunks)
    keys, values = kv.read(0, S)
    q = split_qkv(qkv[None], Hq, Hkv, D)[0]
    np.testing.assert_allclose(got, reference_attention(q, keys, values, [S - 1], slopes)[0], rtol=1e-4, atol=1e-5)
    unbiased = native.attention(Hq, Hkv, D, None, None, 2)(qkv, kv.pools[0], kv.chunks)
    assert not np.allclose(got, unbiased, atol=1e-3)  # the bias matters here


@pytest.mark.parametrize("table", [[2, 3, 4], [5, 1, 3]])
def test_attention_reads_paged_blocks_in_place(table):
    # blocks in any order, read where they lie: the same as attention over the blocks gathered in table order
    Hq, Hkv, D, S = 4, 2, 8, 10
    store = PagedKVStore(config(Hq, Hkv, D), num_blocks=6, block_size=4)
    store.k.normal_(generator=torch.Generator().manual_seed(0))
    store.v.normal_(generator=torch.Generator().manual_seed(1))
    kv, qkv = PagedKV(store, table), randn((Hq + 2 * Hkv) * D)
    kv.chunks.advance_to(S)
    got = native.attention(Hq, Hkv, D, None, None, 2)(qkv, kv.pools[1], kv.chunks)
    np.testing.assert_array_equal(store.k[1, :, table[2], 1].numpy(), split_qkv(qkv[None], Hq, Hkv, D)[1][0])
    keys = torch.cat([store.k[1, :, b] for b in table], dim=1)[:, :S].numpy()  # (Hkv, S, D)
    values = torch.cat([store.v[1, :, b] for b in table], dim=1)[:, :S].numpy()
    q = split_qkv(qkv[None], Hq, Hkv, D)[0]
    np.testing.assert_allclose(got, reference_attention(q, keys, values, [S - 1])[0], rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pos", sorted(POSITIONS))
def test_attention_of_a_step_with_prompt_chunks_and_decodes(pos, threads):
    # three sequences in one call: a prompt chunk of 5 after 6 cached tokens, one decode, a whole prompt of 7; each
    # row attends causally over its own sequence's blocks, all scattered over one pool. Every position scheme: what
    # the kernel takes of it (RoPE's tables, ALiBi's slopes; nothing of those added to the embeddings)
    Hq, Hkv, D, bs = 4, 2, 8, 4
    numpy_positions = decode.POSITIONS[pos](build_model(config(Hq, Hkv, D, pos=pos), seed=0).positions)
    rope, slopes = numpy_positions.tables, numpy_positions.slopes
    store = PagedKVStore(config(Hq, Hkv, D), num_blocks=12, block_size=bs)
    store.k.normal_(generator=torch.Generator().manual_seed(0))
    store.v.normal_(generator=torch.Generator().manual_seed(1))
    tables, ends, counts = [[7, 2, 9], [0, 11], [4, 1]], [11, 6, 7], [5, 1, 7]
    chunks = native.Chunks(tables, ends, counts, bs)
    qkv = randn(sum(counts), (Hq + 2 * Hkv) * D)
    attention = native.attention(Hq, Hkv, D, slopes, rope, threads)
    got = attention(qkv, native.pools(store.k.numpy(), store.v.numpy())[1], chunks)
    assert got.shape == (13, Hq * D)
    first = 0
    for table, end, count in zip(tables, ends, counts, strict=True):
        where = list(range(end - count, end))
        q, k, v = split_qkv(qkv[first : first + count], Hq, Hkv, D)
        if rope:
            cos, sin = rope[0][where][:, None], rope[1][where][:, None]
            q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
        keys = torch.cat([store.k[1, :, b] for b in table], dim=1)[:, :end].numpy()  # (Hkv, end, D)
        values = torch.cat([store.v[1, :, b] for b in table], dim=1)[:, :end].numpy()
        np.testing.assert_allclose(keys[:, end - count :], k.transpose(1, 0, 2), rtol=1e-5, atol=1e-6)  # written
        np.testing.assert_array_equal(values[:, end - count :], v.transpose(1, 0, 2))
        expected = reference_attention(q, keys, values, where, slopes)
        np.testing.assert_allclose(got[first : first + count], expected, rtol=1e-4, atol=1e-5)
        first += count


def llama(pos: str):
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32)
    return build_model(dataclasses.replace(cfg, pos=pos), seed=0).eval()  # RMSNorm, SwiGLU, no biases: Llama's


def layer_weights(model) -> list[native.LayerWeights]:
    return [
        native.LayerWeights(*(m.weight.detach().numpy() for m in (b.attn_norm, b.attn.qkv, b.attn.proj, b.mlp_norm)),
                            b.mlp.gate_up.weight.detach().numpy(), b.mlp.down.weight.detach().numpy())
        for b in model.layers
    ]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pos", sorted(POSITIONS))
@torch.inference_mode()
def test_all_layers_in_one_call_equal_the_models_layers(pos, threads):
    # the step of test_attention_of_a_step_with_prompt_chunks_and_decodes through both layers of a Llama-style model,
    # in place, against its torch forward pass over a PagedBatch of the same chunks: hidden states and written caches
    model = llama(pos)
    numpy_positions = decode.POSITIONS[pos](model.positions)
    rope, slopes = numpy_positions.tables, numpy_positions.slopes
    layers = native.layers(layer_weights(model), model.cfg.norm_eps, 4, 2, 8, slopes, rope, threads)
    stores = [PagedKVStore(model.cfg, num_blocks=12, block_size=4) for _ in range(2)]
    cached = torch.randn((2, *stores[0].k.shape), generator=torch.Generator().manual_seed(0))
    for store in stores:  # the same cached tokens before the step in both
        store.k.copy_(cached[0]), store.v.copy_(cached[1])
    tables, ends, counts = [[7, 2, 9], [0, 11], [4, 1]], [11, 6, 7], [5, 1, 7]
    tokens = torch.randint(50, (sum(counts),), generator=torch.Generator().manual_seed(1)).split(counts)
    batch = PagedBatch(
        stores[1], [Chunk(t.tolist(), e - len(t), b) for t, e, b in zip(tokens, ends, tables, strict=True)]
    )
    expected = model.hidden_states(batch.ids, batch)[0].numpy()
    x = model.positions.embed(model.embed(batch.ids), batch.pos)[0].numpy()  # (N, C), learned or sinusoidal added
    pools = native.pools(stores[0].k.numpy(), stores[0].v.numpy())
    assert layers(x, pools, native.Chunks(tables, ends, counts, 4)) is None
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)  # x now holds the last layer's output
    torch.testing.assert_close(stores[0].k, stores[1].k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stores[0].v, stores[1].v, rtol=1e-5, atol=1e-5)


def test_all_layers_refuse_what_they_cannot_read():
    model, kv = llama("learned"), filled_cache(4, 2, 8, 16)
    weights = layer_weights(model)
    layers = native.layers(weights, 1e-5, 4, 2, 8, None, None, 1)
    with pytest.raises(ValueError, match=r"a layer's proj weight must be fp32 \(32, 32\), not float32 \(32, 31\)"):
        native.layers([weights[0]._replace(proj=randn(32, 31)), *weights[1:]], 1e-5, 4, 2, 8, None, None, 1)
    with pytest.raises(ValueError, match=r"must be a C-contiguous fp32 \(rows, 32\) array, not float32 \(32, 1\)"):
        layers(randn(1, 32).T, kv.pools, kv.chunks)
    with pytest.raises(ValueError, match="2 layers need as many pools of one layout, not 1"):
        layers(randn(1, 32), kv.pools[:1], kv.chunks)
    with pytest.raises(ValueError, match="qkv has 2 rows for chunks of 1 tokens"):
        layers(randn(2, 32), kv.pools, kv.chunks)
    with pytest.raises(ValueError, match="over row-major weights take one row at a time, not 2"):
        native.layers(weights, 1e-5, 4, 2, 8, None, None, 1, packed=False)(randn(2, 32), kv.pools, kv.chunks)


def test_kernels_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="weight must be fp32"):
        native.matvec(randn(4, 4).astype(np.float64), 1)
    with pytest.raises(ValueError, match="weight must be fp32 with a unit last stride"):
        native.matvec(randn(4, 4).T[:, ::2], 1)
    with pytest.raises(ValueError, match=r"takes a \(4,\) fp32 vector, not float32 \(5,\)"):
        native.matvec(randn(4, 4), 1)(randn(5))
    with pytest.raises(ValueError, match=r"not float64 \(4,\)"):  # a float64 vector would be read as garbage
        native.matvec(randn(4, 4), 1)(randn(4).astype(np.float64))
    with pytest.raises(ValueError, match=r"transposed weight must be a fp32 matrix, not float64 \(4, 4\)"):
        native.matmul(randn(4, 4).astype(np.float64), 1)
    with pytest.raises(ValueError, match=r"input of a \(4, 3\) matmul must be fp32 of shape \(rows, 4\)"):
        native.matmul(randn(4, 3), 1)(randn(2, 5))
    with pytest.raises(ValueError, match=r"not float64 \(2, 4\)"):
        native.matmul(randn(4, 3), 1)(randn(2, 4).astype(np.float64))
    with pytest.raises(ValueError, match=r"SwiGLU's gate and up must be fp32 of shape \(rows, 8\)"):
        native.silu_mul(4, 1)(randn(2, 6))
    with pytest.raises(ValueError, match=r"RMSNorm's input must be fp32 of shape \(rows, 4\)"):
        native.rmsnorm(randn(4), 1e-5, 1)(randn(4).astype(np.float64))
    with pytest.raises(ValueError, match="ALiBi slopes"):
        native.attention(4, 2, 8, np.ones(3, np.float32), None, 1)
    with pytest.raises(ValueError, match="cannot share 3 kv heads"):
        native.attention(4, 3, 8, None, None, 1)
    with pytest.raises(ValueError, match=r"RoPE's cos and sin must be two \(positions, 8\) tables"):
        native.attention(4, 2, 8, None, (np.ones((5, 8), np.float32), np.ones((5, 6), np.float32)), 1)
    kv = filled_cache(4, 2, 8, 16)
    attention = native.attention(4, 2, 8, None, None, 1)
    with pytest.raises(ValueError, match=r"qkv must be fp32 of shape \(rows, 64\)"):
        attention(randn(63), kv.pools[0], kv.chunks)
    with pytest.raises(ValueError, match="qkv has 2 rows for chunks of 1 tokens"):
        attention(randn(2, 64), kv.pools[0], kv.chunks)
    with pytest.raises(ValueError, match=r"writes a \(1, 32\) fp32 out"):
        attention(randn(1, 64), kv.pools[0], kv.chunks, out=np.empty((1, 31), np.float32))
    with pytest.raises(ValueError, match="chunks count blocks of 4, the pool's are 16"):
        attention(randn(64), kv.pools[0], native.Chunks([[0, 1]], [3], [1], 4))
    with pytest.raises(ValueError, match="ending at 17 does not fit a table of 16 positions"):
        kv.chunks.advance_to(17)  # would write past the cache
    with pytest.raises(ValueError, match="a chunk of 3 tokens ending at 2"):
        native.Chunks([[0]], [2], [3], 16)  # more new tokens than the sequence holds
    rope = (np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32))
    kv.chunks.advance_to(9)
    with pytest.raises(ValueError, match="a position past RoPE's table of 8"):
        native.attention(4, 2, 8, None, rope, 1)(randn(64), kv.pools[0], kv.chunks)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """Kernels built from scratch into tmp_path (XDG_CACHE_HOME), forgotten again afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native._library.cache_clear()
    yield tmp_path / "lmforge" / "native"
    monkeypatch.undo()
    native._library.cache_clear()


def test_build_is_cached_and_leaves_no_temporary_file(fresh_build):
    assert native.available()
    (library,) = fresh_build.iterdir()  # one .so named by the hash, no .tmp beside it
    assert library.name.startswith("decode_kernels-") and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    native._library.cache_clear()
    assert native.available() and library.stat().st_mtime_ns == built  # loaded, not rebuilt


def test_a_failing_compiler_means_numpy_alone(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exits 1 for anything: as a compiler without OpenMP would fail
    assert not native.available()
    assert native.matvec(randn(2, 2), 1) is None and native.matmul(randn(2, 2), 1) is None
    assert native.attention(2, 1, 4, None, None, 1) is None
    assert native.silu_mul(2, 1) is None and native.rmsnorm(randn(2), 1e-5, 1) is None
    kv = PagedKV(PagedKVStore(config(2, 1, 4), 2, 4), [0])
    assert kv.pools == [] and kv.chunks is None  # no addresses taken for the numpy path
    assert not fresh_build.exists() or not any(fresh_build.iterdir())
