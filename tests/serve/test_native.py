"""The C decode kernels (serve/native.py) against float64 numpy references, on one thread and on two, over the
decoder's own caches (CacheKV, paged blocks in any order), and how they are built: cached by hash, nothing
half-written, and None (numpy fallback) when no compiler works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.models import KVCache, ModelConfig, build_model
from lmforge.serve import native
from lmforge.serve.cpu_decode import CacheKV, PagedKV, _RotaryPositions
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


def test_reused_output_is_overwritten_by_the_next_call():
    w, x1, x2 = randn(8, 5), randn(5), randn(5)
    fresh, reused = native.matvec(w, 1), native.matvec(w, 1, reuse_output=True)
    a, b = fresh(x1), fresh(x2)
    assert a is not b and not np.allclose(a, b)
    first = reused(x1)
    np.testing.assert_allclose(first, a, rtol=1e-6)
    assert reused(x2) is first  # the same array, now holding W x2
    np.testing.assert_allclose(first, b, rtol=1e-6)


def reference_attention(q, keys, values, slopes=None):
    """q (Hq, D), keys and values (Hkv, S, D) -> (Hq * D,) in float64: softmax(q k / sqrt(D) + ALiBi bias) v."""
    Hq, Hkv, S, D = q.shape[0], keys.shape[0], keys.shape[1], q.shape[1]
    out = []
    for h in range(Hq):
        g = h // (Hq // Hkv)
        scores = keys[g].astype(np.float64) @ q[h] / np.sqrt(D)
        if slopes is not None:
            scores += slopes[h] * (np.arange(S) - (S - 1))
        p = np.exp(scores - scores.max())
        out.append(p / p.sum() @ values[g])
    return np.concatenate(out)


def rope_rotate(x, cos, sin):
    """HF LLaMA's half-split rotation of the rows of x (n, D) by the (D,) cos and sin rows of one position."""
    half = x.shape[1] // 2
    return x * cos + np.concatenate([-x[:, half:], x[:, :half]], axis=1) * sin


def config(Hq: int, Hkv: int, D: int, pos: str = "learned") -> ModelConfig:
    return ModelConfig(vocab_size=8, dim=Hq * D, n_layers=2, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8, pos=pos)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("Hq", "Hkv", "S"), [(4, 4, 1), (4, 2, 9), (6, 2, 33), (8, 1, 300)])
def test_attention_writes_the_newest_kv_and_attends_over_the_cache(Hq, Hkv, S, threads):
    D, layer = 16, 1
    cache = KVCache(config(Hq, Hkv, D), 1, 512)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    kv, qkv = CacheKV(cache), randn((Hq + 2 * Hkv) * D)
    got = native.attention(Hq, Hkv, D, None, threads)(qkv, None, kv.layouts[layer], S)
    k_new, v_new = qkv[Hq * D : (Hq + Hkv) * D].reshape(Hkv, D), qkv[(Hq + Hkv) * D :].reshape(Hkv, D)
    np.testing.assert_array_equal(kv.k[layer, :, S - 1], k_new)  # written at position S - 1 of this layer only
    np.testing.assert_array_equal(kv.v[layer, :, S - 1], v_new)
    assert not np.array_equal(kv.k[0, :, S - 1], k_new)
    keys, values = kv.read(layer, S)
    expected = reference_attention(qkv[: Hq * D].reshape(Hq, D), keys, values)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_rotates_q_and_k_by_rope():
    Hq, Hkv, D, S = 4, 2, 16, 12
    cfg = config(Hq, Hkv, D, pos="rope")
    positions = _RotaryPositions(build_model(cfg, seed=0).positions)
    cache = KVCache(cfg, 1, 32)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    kv, qkv = CacheKV(cache), randn((Hq + 2 * Hkv) * D)
    got = native.attention(Hq, Hkv, D, None, 2)(qkv, positions.rope(S - 1), kv.layouts[0], S)
    cos, sin = positions.cos[S - 1], positions.sin[S - 1]
    k_new = rope_rotate(qkv[Hq * D : (Hq + Hkv) * D].reshape(Hkv, D), cos, sin)
    np.testing.assert_allclose(kv.k[0, :, S - 1], k_new, rtol=1e-5, atol=1e-6)
    keys, values = kv.read(0, S)
    expected = reference_attention(rope_rotate(qkv[: Hq * D].reshape(Hq, D), cos, sin), keys, values)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_attention_adds_alibi_bias():
    Hq, Hkv, D, S = 6, 3, 8, 20
    cache = KVCache(config(Hq, Hkv, D), 1, 32)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    kv, qkv = CacheKV(cache), randn((Hq + 2 * Hkv) * D)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625, 0.7, 0.35], np.float32)
    got = native.attention(Hq, Hkv, D, slopes, 2)(qkv, None, kv.layouts[0], S)
    keys, values = kv.read(0, S)
    expected = reference_attention(qkv[: Hq * D].reshape(Hq, D), keys, values, slopes)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    unbiased = native.attention(Hq, Hkv, D, None, 2)(qkv, None, kv.layouts[0], S)
    assert not np.allclose(got, unbiased, atol=1e-3)  # the bias matters here


@pytest.mark.parametrize("table", [[2, 3, 4], [5, 1, 3]])
def test_attention_reads_paged_blocks_in_place(table):
    # blocks in any order, read where they lie: the same as attention over the blocks gathered in table order
    Hq, Hkv, D, S = 4, 2, 8, 10
    store = PagedKVStore(config(Hq, Hkv, D), num_blocks=6, block_size=4)
    store.k.normal_(generator=torch.Generator().manual_seed(0))
    store.v.normal_(generator=torch.Generator().manual_seed(1))
    kv, qkv = PagedKV(store, table), randn((Hq + 2 * Hkv) * D)
    got = native.attention(Hq, Hkv, D, None, 2)(qkv, None, kv.layouts[1], S)
    np.testing.assert_array_equal(store.k[1, :, table[2], 1].numpy(), qkv[Hq * D : (Hq + Hkv) * D].reshape(Hkv, D))
    keys = torch.cat([store.k[1, :, b] for b in table], dim=1)[:, :S].numpy()  # (Hkv, S, D)
    values = torch.cat([store.v[1, :, b] for b in table], dim=1)[:, :S].numpy()
    np.testing.assert_allclose(got, reference_attention(qkv[: Hq * D].reshape(Hq, D), keys, values), rtol=1e-4)


def test_kernels_refuse_what_they_cannot_read():
    with pytest.raises(ValueError, match="weight must be fp32"):
        native.matvec(randn(4, 4).astype(np.float64), 1)
    with pytest.raises(ValueError, match="weight must be fp32 with a unit last stride"):
        native.matvec(randn(4, 4).T[:, ::2], 1)
    with pytest.raises(ValueError, match=r"takes a \(4,\) fp32 vector, not float32 \(5,\)"):
        native.matvec(randn(4, 4), 1)(randn(5))
    with pytest.raises(ValueError, match=r"not float64 \(4,\)"):  # a float64 vector would be read as garbage
        native.matvec(randn(4, 4), 1)(randn(4).astype(np.float64))
    with pytest.raises(ValueError, match="ALiBi slopes"):
        native.attention(4, 2, 8, np.ones(3, np.float32), 1)
    with pytest.raises(ValueError, match="cannot share 3 kv heads"):
        native.attention(4, 3, 8, None, 1)
    kv = CacheKV(KVCache(config(4, 2, 8), 1, 16))
    attention = native.attention(4, 2, 8, None, 1)
    with pytest.raises(ValueError, match=r"contiguous \(64,\) fp32 qkv, not float32 \(63,\)"):
        attention(randn(63), None, kv.layouts[0], 3)
    with pytest.raises(ValueError, match="position 16 is outside the cache's 16 positions"):
        attention(randn(64), None, kv.layouts[0], 17)  # would write past the cache


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
    assert native.matvec(randn(2, 2), 1) is None and native.attention(2, 1, 4, None, 1) is None
    assert PagedKV(PagedKVStore(config(2, 1, 4), 2, 4), [0]).layouts == []  # no addresses taken for the numpy path
    assert not fresh_build.exists() or not any(fresh_build.iterdir())


@pytest.mark.parametrize(
    "variant",
    [dict(pos="rope", n_kv_heads=2), dict(pos="alibi", n_kv_heads=2), dict(pos="learned", n_kv_heads=4)],
    ids=["rope-gqa", "alibi-gqa", "learned-mha"],
)
@torch.inference_mode()
def test_engine_decode_batch_through_the_kernel_equals_sdpa(variant, request):
    # three sequences prefilled to different lengths in blocks scattered over the pool, then one batched decode step:
    # the C kernel over the blocks in place and SDPA over the gathered blocks give the same hidden states
    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32, **variant)
    model = build_model(cfg, seed=0).eval()
    tables, prompts = [[0, 1, 2], [5, 3], [4, 6, 7, 8]], [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [7] * 13]

    def decode_step() -> torch.Tensor:
        store = PagedKVStore(cfg, num_blocks=10, block_size=4)
        prefill = PagedBatch(store, [Chunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
        model.hidden_states(prefill.ids, prefill)
        decodes = [Chunk([20 + i], len(p), t) for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]
        batch = PagedBatch(store, decodes)
        hidden = model.hidden_states(batch.ids, batch)
        assert bool(batch._native) == native.available()  # the decodes went the way this test means
        return hidden

    with_kernel = decode_step()
    request.getfixturevalue("numpy_only")
    torch.testing.assert_close(with_kernel, decode_step(), rtol=1e-5, atol=1e-5)
