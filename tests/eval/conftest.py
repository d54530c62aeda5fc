"""Fixtures for the evaluation tests: a tiny run with room for a HellaSwag context and its transformers export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add synchronisation on a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A run folder: the shared tiny tokenizer (vocab 512) and a random 2-layer GQA model with a 512-token context."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.models import ModelConfig, build_model

    run_dir = tmp_path_factory.mktemp("eval_run")
    tiny_tokenizer.save(run_dir)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=512)
    save_checkpoint(run_dir, 0, build_model(cfg, seed=0), state={})
    return run_dir


@pytest.fixture(scope="session")
def eval_export(eval_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.interop.hf import export_hf

    return export_hf(eval_run, tmp_path_factory.mktemp("export") / "hf")
