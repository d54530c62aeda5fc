import json

import numpy as np
import pytest
import torch

from lmforge.data import Document, ShardLoader, eval_batches, read_manifest, shards_ready, write_shards
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def docs(tiny_text) -> list[Document]:
    return [Document(str(i), tiny_text[i * 997 : (i + 1) * 997]) for i in range(60)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, docs, tiny_tokenizer):
    out = tmp_path_factory.mktemp("shards")
    write_shards(docs, tiny_tokenizer, out, shard_tokens=5000)
    return out


def test_shards_hold_the_tokenized_docs(shard_dir, docs, tiny_tokenizer):
    manifest = read_manifest(shard_dir)
    expected = [t for d in docs for t in [*tiny_tokenizer.encode(d.text, bos=True), tiny_tokenizer.eos_id]]
    assert manifest["total_tokens"] == len(expected) == sum(s["tokens"] for s in manifest["shards"])
    assert manifest["num_docs"] == len(docs)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 512
    assert manifest["tokenizer_sha256"] == tiny_tokenizer.sha256
    assert len(manifest["shards"]) > 1 and all(s["tokens"] == 5000 for s in manifest["shards"][:-1])
    tokens = np.concatenate([np.fromfile(shard_dir / s["file"], np.uint16) for s in manifest["shards"]])
    assert tokens.tolist() == expected
    assert not list(shard_dir.glob(".*"))  # no temp files left behind


def test_shards_ready_and_rewrite(tmp_path, docs, tiny_tokenizer):
    assert not shards_ready(tmp_path, tiny_tokenizer)
    write_shards(docs, tiny_tokenizer, tmp_path, shard_tokens=3000)
    assert shards_ready(tmp_path, tiny_tokenizer)
    other = Tokenizer.train([d.text for d in docs], 300)
    assert not shards_ready(tmp_path, other)
    manifest = write_shards(docs[:5], tiny_tokenizer, tmp_path, shard_tokens=3000)
    assert sorted(p.name for p in tmp_path.glob("shard_*.bin")) == [s["file"] for s in manifest["shards"]]
    (tmp_path / manifest["shards"][0]["file"]).write_bytes(b"\0\0")
    assert not shards_ready(tmp_path, tiny_tokenizer)
    with pytest.raises(LmforgeError, match="truncated"):
        ShardLoader(tmp_path, 16, 2, seed=0)


def test_uint32_for_big_vocabularies(tmp_path, tiny_text):
    tok = Tokenizer.train([tiny_text[:2000]], 70_000)
    manifest = write_shards([Document("a", "hello")], tok, tmp_path)
    assert manifest["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "shard_00000.bin", np.uint32).tolist() == [*tok.encode("hello", bos=True), 1]


def test_manifest_errors(tmp_path):
    with pytest.raises(LmforgeError, match=r"manifest.json is missing.*rerun data preparation"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="corrupt"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(LmforgeError, match="corrupt"):
        read_manifest(tmp_path)


def test_batches_are_shifted_windows(shard_dir):
    loader = ShardLoader(shard_dir, seq_len=32, batch_size=4, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = _all_windows(shard_dir, 32)
    rows = {tuple(w[:-1]) for w in windows}
    assert all(tuple(r) in rows for r in x.tolist())


def _all_windows(shard_dir, seq_len: int) -> list[list[int]]:
    manifest = read_manifest(shard_dir)
    out = []
    for s in manifest["shards"]:
        a = np.fromfile(shard_dir / s["file"], np.uint16).tolist()
        out += [a[i : i + seq_len + 1] for i in range(0, len(a) - seq_len, seq_len)]
    return out


def _take(loader: ShardLoader, n: int) -> list[torch.Tensor]:
    return [torch.cat(loader.next_batch(), dim=1) for _ in range(n)]


def test_loader_deterministic_and_seeded(shard_dir):
    a = _take(ShardLoader(shard_dir, 32, 4, seed=1), 5)
    b = _take(ShardLoader(shard_dir, 32, 4, seed=1), 5)
    c = _take(ShardLoader(shard_dir, 32, 4, seed=2), 5)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_epoch_covers_every_window_once(shard_dir):
    loader = ShardLoader(shard_dir, 64, 1, seed=3)
    n = loader.windows.total
    assert n == len(_all_windows(shard_dir, 64))
    seen = [tuple(loader.next_batch()[0][0].tolist()) for _ in range(n)]
    assert sorted(seen) == sorted(tuple(w[:-1]) for w in _all_windows(shard_dir, 64))
    assert loader.state_dict() == {"epoch": 0, "cursor": n}


@pytest.mark.parametrize("where", ["start", "middle", "before_epoch_end", "after_epoch_end"])
def test_resume_is_exact(shard_dir, where):
    per_epoch = ShardLoader(shard_dir, 64, 7, seed=5).per_rank
    assert per_epoch % 7  # an epoch ends inside a batch, so that batch mixes two epochs
    k = {"start": 0, "middle": 3, "before_epoch_end": per_epoch // 7, "after_epoch_end": per_epoch // 7 + 1}[where]
    full = _take(ShardLoader(shard_dir, 64, 7, seed=5), k + 4)
    first = ShardLoader(shard_dir, 64, 7, seed=5)
    _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == (where == "after_epoch_end")
    resumed = ShardLoader(shard_dir, 64, 7, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(_take(resumed, 4), full[k:], strict=True))
    assert resumed.state_dict()["epoch"] == 1 - (where in ("start", "middle"))


def test_rank_slices_are_disjoint(shard_dir):
    world = 3
    loaders = [ShardLoader(shard_dir, 32, 1, seed=0, rank=r, world_size=world) for r in range(world)]
    per_rank = loaders[0].per_rank
    seen = [{tuple(torch.cat(ld.next_batch(), 1)[0].tolist()) for _ in range(per_rank)} for ld in loaders]
    assert all(len(s) == per_rank for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert per_rank * world > loaders[0].windows.total - world


def test_eval_batches_in_order(shard_dir):
    windows = _all_windows(shard_dir, 32)
    batches = list(eval_batches(shard_dir, 32, 4, max_batches=3))
    assert len(batches) == 3
    x = torch.cat([b[0] for b in batches])
    assert x.tolist() == [w[:-1] for w in windows[:12]]
    everything = list(eval_batches(shard_dir, 32, 5, max_batches=10_000))
    assert torch.cat([b[0] for b in everything]).tolist() == [w[:-1] for w in windows]
    assert all(len(b[0]) == 5 for b in everything[:-1])


def test_too_small_corpus(tmp_path, tiny_tokenizer):
    manifest = write_shards([Document("a", "tiny")], tiny_tokenizer, tmp_path)
    n = manifest["total_tokens"]
    with pytest.raises(LmforgeError, match=rf"corpus has {n} tokens, fewer than one training window.*max_seq_len"):
        ShardLoader(tmp_path, 128, 2, seed=0)
    with pytest.raises(LmforgeError, match="fewer than one training window"):
        list(eval_batches(tmp_path, 128, 2, 1))
    assert ShardLoader(tmp_path, n - 1, 2, seed=0).next_batch()[0].shape == (2, n - 1)
