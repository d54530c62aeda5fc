"""Compressed checkpoints: the base's model.json, the compressed weights in model.safetensors, and compression.json
(the base run, the method and its options, each compressed module's spec, the weights' SHA-256 and the tokenizer's
vocabulary hash), written in one temp folder renamed into place. Loading rebuilds the model from the specs and refuses
a file whose hash, shapes or tokenizer do not match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lmforge.checkpoint import load_weights, read_shapes, save_checkpoint
from lmforge.compress.modules import install, specs
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, ModelConfig

COMPRESSION = "compression.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def vocabulary_hash(tokenizer) -> str:
    vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def save_compressed(run_dir: str | Path, model: Decoder, tokenizer, info: dict[str, Any], step: int = 0) -> Path:
    """Write the compressed model as checkpoint `step` of run_dir; info: base, method, options (what it remembers)."""

    def describe(folder: Path) -> dict[str, Any]:
        return {
            **info,
            "modules": specs(model),
            "sha256": file_sha256(folder / "model.safetensors"),
            "vocabulary": vocabulary_hash(tokenizer),
        }

    return save_checkpoint(run_dir, step, model, {"compressed": info.get("method")}, extra_json={COMPRESSION: describe})


def read_compression(ckpt: Path) -> dict[str, Any]:
    path = ckpt / COMPRESSION
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path} is missing or corrupt ({e}); compress the base run again") from None
    if not isinstance(info, dict) or not isinstance(info.get("modules"), dict) or "sha256" not in info:
        raise LmforgeError(f"{path} lacks its modules or hash; compress the base run again")
    return info


def load_compressed(ckpt: Path, cfg: ModelConfig, device: str | torch.device = "cpu") -> Decoder:
    """The compressed model of checkpoint folder `ckpt` (whose model.json gave cfg), checked against its hash."""
    from lmforge.compress import main  # noqa: F401  importing the methods puts their module kinds in BUILDERS

    info = read_compression(ckpt)
    weights = ckpt / "model.safetensors"
    fix = "the file was changed or cut short; compress the base run again"
    if not weights.is_file() or file_sha256(weights) != info["sha256"]:
        raise LmforgeError(f"{weights} does not match the hash in {COMPRESSION}: {fix}")
    shapes = read_shapes(weights)
    layers = {int(n.split(".")[1]) for n in [*shapes, *info["modules"]] if n.startswith("layers.")}
    if max(layers, default=-1) + 1 != cfg.n_layers:
        raise LmforgeError(f"{ckpt}/model.json says n_layers={cfg.n_layers}, the weights hold another count: {fix}")
    with torch.device("meta"):
        model = install(Decoder(cfg), info["modules"])
        for module in list(model.modules()):
            if hasattr(module, "bind"):
                module.bind(model)  # a shared layer takes its source layer's modules before the weights load
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in shapes.items():
        if wanted.get(name) != shape:
            raise LmforgeError(f"{weights} holds {name} {list(shape)}, the model needs {wanted.get(name)}: {fix}")
    model.to_empty(device=device)
    model.positions.init_weights()
    if cfg.tie_embeddings and type(model.lm_head) is nn.Linear:
        model.lm_head.weight = model.embed.weight
    load_weights(model, weights)
    model.compression = {k: v for k, v in info.items() if k not in ("modules", "sha256")}
    return model.eval()


def check_tokenizer(ckpt: Path, tokenizer_path: Path) -> None:
    """Refuse a tokenizer whose vocabulary is not the one the model was compressed with."""
    from lmforge.tokenizer import Tokenizer

    expected = read_compression(ckpt).get("vocabulary")
    if expected and vocabulary_hash(Tokenizer.load(tokenizer_path)) != expected:
        raise LmforgeError(
            f"{tokenizer_path} is not the tokenizer {ckpt} was compressed with (its vocabulary differs); "
            "copy the base run's tokenizer.json back"
        )
