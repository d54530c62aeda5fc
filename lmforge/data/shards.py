"""Token shards: documents tokenized once into flat uint16/uint32 files plus a manifest, read back as shuffled,
exactly resumable windows of seq_len + 1 tokens."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.corpus import Document
from lmforge.errors import LmforgeError
from lmforge.run import atomic_write
from lmforge.tokenizer import Tokenizer

FORMAT_VERSION = 1
_BATCH_DOCS = 512


def write_shards(
    docs: Iterable[Document], tokenizer: Tokenizer, out_dir: str | Path, shard_tokens: int = 1 << 24
) -> dict[str, Any]:
    """Tokenize `docs` (each as bos, text, eos) into out_dir/shard_NNNNN.bin files, then write manifest.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The manifest goes first and comes back last, so a crash never leaves one describing half-written shards.
    (out_dir / "manifest.json").unlink(missing_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    pending_tokens = num_docs = 0

    def flush(final: bool) -> None:
        nonlocal pending, pending_tokens
        buf = np.concatenate(pending) if pending else np.zeros(0, dtype)
        while len(buf) >= shard_tokens or (final and len(buf)):
            chunk, buf = buf[:shard_tokens], buf[shard_tokens:]
            name = f"shard_{len(shards):05d}.bin"
            atomic_write(out_dir / name, chunk.tobytes())
            shards.append({"file": name, "tokens": len(chunk)})
        pending, pending_tokens = [buf], len(buf)

    it = iter(docs)
    while batch := list(islice(it, _BATCH_DOCS)):
        # bos opens every document so that generation, which starts from bos, sees what training saw
        for ids in tokenizer.encode_batch([d.text for d in batch], bos=True):
            ids.append(tokenizer.eos_id)
            pending.append(np.array(ids, dtype=dtype))
            pending_tokens += len(ids)
        num_docs += len(batch)
        if pending_tokens >= shard_tokens:
            flush(final=False)
    flush(final=True)
    keep = {s["file"] for s in shards}
    for stale in out_dir.glob("shard_*.bin"):
        if stale.name not in keep:
            stale.unlink()
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.sha256,
        "total_tokens": sum(s["tokens"] for s in shards),
        "num_docs": num_docs,
        "shards": shards,
    }
    atomic_write(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(dir: str | Path) -> dict[str, Any]:
    path = Path(dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        if manifest["format_version"] != FORMAT_VERSION or manifest["dtype"] not in ("uint16", "uint32"):
            raise ValueError(f"format_version {manifest['format_version']}, dtype {manifest['dtype']}")
        if not all(isinstance(s["file"], str) and isinstance(s["tokens"], int) for s in manifest["shards"]):
            raise ValueError("malformed shards list")
    except FileNotFoundError:
        raise LmforgeError(
            f"{path} is missing: the shards were never written or were interrupted; rerun data "
            "preparation (it tokenizes the corpus again)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LmforgeError(
            f"{path} is corrupt or from another lmforge version ({e!r}); delete {dir} and rerun data preparation"
        ) from None
    return manifest


def shards_ready(dir: str | Path, tokenizer: Tokenizer) -> bool:
    """True when complete shards made by this exact tokenizer are in `dir`, so a rerun can reuse them."""
    try:
        manifest = read_manifest(dir)
    except LmforgeError:
        return False
    size = np.dtype(manifest["dtype"]).itemsize
    return manifest["tokenizer_sha256"] == tokenizer.sha256 and all(
        (Path(dir) / s["file"]).is_file() and (Path(dir) / s["file"]).stat().st_size == s["tokens"] * size
        for s in manifest["shards"]
    )


def _shard_paths(dir: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """The manifest's shard files, each checked to exist at its recorded size."""
    paths = []
    for s in manifest["shards"]:
        path = Path(dir) / s["file"]
        if not path.is_file() or path.stat().st_size != s["tokens"] * np.dtype(manifest["dtype"]).itemsize:
            raise LmforgeError(f"shard {path} is missing or truncated; delete {dir} and rerun data preparation")
        paths.append(path)
    return paths


def shard_arrays(dir: str | Path) -> list[np.ndarray]:
    """Each shard's tokens, memory-mapped read-only, in manifest order."""
    manifest = read_manifest(dir)
    return [np.memmap(path, dtype=manifest["dtype"], mode="r") for path in _shard_paths(dir, manifest)]


def link_shards(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Make `dst` hold the shards of `src`: hard links where the filesystem allows, else copies. A link never lets one
    folder change the other's data, since shards and manifests are only ever replaced (by rename), never rewritten."""
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    paths = _shard_paths(src, manifest)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "manifest.json").unlink(missing_ok=True)  # as in write_shards: no manifest over half-linked shards
    for path in paths:
        tmp = dst / f".{path.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # another filesystem, or one without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, dst / path.name)
    keep = {path.name for path in paths}
    for stale in dst.glob("shard_*.bin"):
        if stale.name not in keep:
            stale.unlink()
    atomic_write(dst / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


class _Windows:
    """Non-overlapping windows of seq_len + 1 tokens (stride seq_len) over each shard, numbered shard by shard."""

    def __init__(self, dir: str | Path, seq_len: int):
        manifest = read_manifest(dir)
        self.seq_len = seq_len
        self.arrays = shard_arrays(dir)
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.ends = np.cumsum(counts)
        self.total = int(self.ends[-1]) if counts else 0
        if manifest["total_tokens"] < seq_len + 1:
            raise LmforgeError(
                f"corpus has {manifest['total_tokens']} tokens, fewer than one training window of "
                f"seq_len+1={seq_len + 1}; add data or lower model.max_seq_len"
            )
        if self.total == 0:
            raise LmforgeError(
                f"no shard in {dir} holds a window of {seq_len + 1} tokens; rewrite the shards with "
                "a larger shard_tokens"
            )

    def batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for i in indices:
            shard = int(np.searchsorted(self.ends, i, side="right"))
            start = (i - (int(self.ends[shard - 1]) if shard else 0)) * self.seq_len
            rows.append(self.arrays[shard][start : start + self.seq_len + 1])
        data = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return data[:, :-1], data[:, 1:]


class ShardLoader:
    """Training batches: each epoch a fresh permutation of all windows (seeded by seed + epoch), dealt round-robin
    to the ranks; state_dict() is (epoch, cursor), from which any position is rebuilt exactly."""

    def __init__(self, dir: str | Path, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        assert 0 <= rank < world_size and batch_size > 0
        self.windows = _Windows(dir, seq_len)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        # Every rank gets the same number of windows per epoch, so ranks stay in step.
        self.per_rank = self.windows.total // world_size
        if self.per_rank == 0:
            raise LmforgeError(
                f"{dir} has {self.windows.total} training windows, fewer than the {world_size} ranks; add data or "
                "lower model.max_seq_len"
            )
        self.epoch = self.cursor = 0
        self._order_epoch, self._order_cache = -1, np.zeros(0, np.int64)

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng(self.seed + self.epoch).permutation(self.windows.total)
            self._order_cache = perm[: self.per_rank * self.world_size][self.rank :: self.world_size]
            self._order_epoch = self.epoch
        return self._order_cache

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape (batch_size, seq_len), int64, y shifted one token ahead of x."""
        picked = []
        while len(picked) < self.batch_size:
            if self.cursor >= self.per_rank:
                self.epoch, self.cursor = self.epoch + 1, 0
            take = min(self.batch_size - len(picked), self.per_rank - self.cursor)
            picked.extend(self._order()[self.cursor : self.cursor + take].tolist())
            self.cursor += take
        return self.windows.batch(picked)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def eval_batches(
    dir: str | Path, seq_len: int, batch_size: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first windows in order, at most max_batches batches; the last one is smaller when windows run out."""
    windows = _Windows(dir, seq_len)
    for start in range(0, min(windows.total, batch_size * max_batches), batch_size):
        yield windows.batch(range(start, min(start + batch_size, windows.total)))
