"""The C decode kernels (serve/native.py) against float64 numpy references, on one thread and on two, and how they are
built: cached by hash, nothing half-written, and None (numpy fallback) when no compiler works."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.serve import native

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
    Hq, Hkv, S = q.shape[0], keys.shape[0], keys.shape[1]
    out = []
    for h in range(Hq):
        g = h // (Hq // Hkv)
        scores = keys[g].astype(np.float64) @ q[h]
        if slopes is not None:
            scores += slopes[h] * (np.arange(S) - (S - 1))
        p = np.exp(scores - scores.max())
        out.append(p / p.sum() @ values[g])
    return np.concatenate(out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("Hq", "Hkv", "S"), [(4, 4, 1), (4, 2, 9), (6, 2, 33), (8, 1, 300)])
def test_attend_matches_softmax_attention(Hq, Hkv, S, threads):
    D = 16
    cache_k, cache_v = randn(Hkv, 512, D), randn(Hkv, 512, D)
    keys, values = cache_k[:, :S], cache_v[:, :S]  # views into a longer cache: the head stride is not S * D
    q = randn(Hq, D)
    got = native.attention(Hq, Hkv, D, None, threads)(q, keys, values)
    np.testing.assert_allclose(got, reference_attention(q, keys, values), rtol=1e-4, atol=1e-5)


def test_attend_adds_alibi_bias():
    q, keys, values = randn(6, 8), randn(3, 20, 8), randn(3, 20, 8)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625, 0.7, 0.35], np.float32)
    got = native.attention(6, 3, 8, slopes, 2)(q, keys, values)
    np.testing.assert_allclose(got, reference_attention(q, keys, values, slopes), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, native.attention(6, 3, 8, None, 2)(q, keys, values), atol=1e-3)  # the bias matters


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
    with pytest.raises(ValueError, match=r"\(2, S, 8\) keys"):
        native.attention(4, 2, 8, None, 1)(randn(4, 8), randn(4, 3, 8), randn(4, 3, 8))


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
    assert not fresh_build.exists() or not any(fresh_build.iterdir())
