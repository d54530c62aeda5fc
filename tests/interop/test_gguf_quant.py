"""Quantized GGUF export: our Q8_0 and Q4_0 blocks equal the gguf package's byte for byte, the file reads back with
gguf's reader (norms in f32, matrices in the file's type) and dequantizes close to the weights, and `lmforge import
gguf` of the export (and of a compressed run's) gives logits close to the model's."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmforge.checkpoint import load_run, save_checkpoint
from lmforge.cli import main as cli
from lmforge.interop.gguf import gguf_tensors
from lmforge.interop.gguf_quants import q4_0, q8_0
from lmforge.models import ModelConfig, build_model

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
OURS = {"q8_0": q8_0, "q4_0": q4_0}


def edge_cases() -> np.ndarray:
    """Random rows, then blocks that test the corners of the reference code: all zero, codes landing on .5 (ties),
    the largest magnitude negative, two weights of equal magnitude and opposite sign, a value just under .5, huge
    and tiny scales."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[0, :32] = 0
    w[1, :32] = np.arange(32) * 0.5 - 8  # q8_0 scale 1/127 * 8: many codes at x.5 exactly after scaling
    w[1, 32:64] = (np.arange(32) - 16) / 2  # q4_0: w / d + 8.5 on integers and halves
    w[2, :32] = -rng.random(32)
    w[2, 7] = -3.0  # largest magnitude negative
    w[3, :32] = rng.random(32)
    w[3, 3], w[3, 9] = 2.0, -2.0  # equal magnitudes: the first wins
    w[4, :32] = np.float32(0.49999997)
    w[4, 0] = 127 * 0.5
    w[5, :32] *= 1e4
    w[6, :32] *= 1e-6
    w[7, 32:64] = rng.integers(-127, 128, 32) + 0.5
    return w


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_blocks_equal_gguf_quants_byte_for_byte(kind):
    w = edge_cases()
    ours = OURS[kind](w)
    theirs = gguf.quants.quantize(w, QTYPES[kind])
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(
        OURS[kind](w[:3, :64].reshape(2, 3, 32)), gguf.quants.quantize(w[:3, :64].reshape(2, 3, 32), QTYPES[kind])
    )


@pytest.mark.parametrize("kind,tied", [("f16", False), ("q8_0", False), ("q4_0", False), ("q4_0", True)])
def test_export_reads_back_and_dequantizes_close_to_the_weights(tiny_run, tiny_tokenizer, tmp_path, kind, tied):
    run = tiny_run
    if tied:  # the embedding is the head: q4_0 keeps it at q8_0
        cfg = ModelConfig(
            vocab_size=512, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=96, tie_embeddings=True
        )
        run = tmp_path / "tied"
        tiny_tokenizer.save(run)
        save_checkpoint(run, 0, build_model(cfg, seed=1), state={})
    out = tmp_path / f"model-{kind}.gguf"
    cli(["export", "gguf", str(run), str(out), "--type", kind])
    model, _ = load_run(run)
    weights = gguf_tensors(model)
    reader = gguf.GGUFReader(out)
    file_types = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[file_types[kind]]
    assert {t.name for t in reader.tensors} == set(weights)
    # per-weight error of a block: q8_0 at most half a step (absmax / 254), q4_0 a step (absmax / 8), f16 ~1e-3
    bound = {"f16": 1e-3, "q8_0": 1 / 254 + 1e-3, "q4_0": 1 / 8 + 1e-3}[kind]
    for t in reader.tensors:
        w = weights[t.name]
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            continue
        head = t.name == "output.weight" or (model.cfg.tie_embeddings and t.name == "token_embd.weight")
        expected = "Q8_0" if kind == "q4_0" and head else kind.upper()
        assert t.tensor_type.name == expected, t.name
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        absmax = w.reshape(-1, 32).abs().amax(1, keepdim=True)
        err = (torch.from_numpy(back.copy()) - w).reshape(-1, 32).abs()
        assert (err <= bound * absmax + 1e-7).all(), t.name
        if expected != "F16":
            np.testing.assert_array_equal(t.data, OURS[expected.lower()](w.numpy()))


def test_q8_0_export_imports_back_with_close_logits(tiny_run, tmp_path, tiny_text):
    out = tmp_path / "model.gguf"
    cli(["export", "gguf", str(tiny_run), str(out), "--type", "q8_0"])
    cli(["import", "gguf", str(out), "--name", "back", "--root", str(tmp_path)])
    model, tokenizer = load_run(tiny_run)
    back, _ = load_run(tmp_path / "back")
    ids = torch.tensor([tokenizer.encode(tiny_text[:400], bos=True)[:100]])
    with torch.no_grad():
        ours, theirs = model(ids), back(ids)
    scale = ours.abs().max()
    assert (theirs - ours).abs().max() < 0.02 * scale
    assert not torch.equal(theirs, ours)  # the weights did go through Q8_0


def test_a_compressed_run_exports_its_dequantized_weights(tiny_run, tmp_path, tiny_text):
    cli(["compress", str(tiny_run), "method=int4", "quant.group_size=32", f"run.root={tmp_path}", "run.name=int4"])
    out = tmp_path / "int4.gguf"
    cli(["export", "gguf", str(tmp_path / "int4"), str(out)])
    cli(["import", "gguf", str(out), "--name", "back", "--root", str(tmp_path)])
    compressed, tokenizer = load_run(tmp_path / "int4")
    back, _ = load_run(tmp_path / "back")
    ids = torch.tensor([tokenizer.encode(tiny_text[:400], bos=True)[:100]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), compressed(ids), atol=1e-4, rtol=1e-4)  # f32 of the int4 weights


def test_export_hf_refuses_a_gguf_type(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli(["export", "hf", str(tiny_run), str(tmp_path / "hf"), "--type", "q8_0"])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--type" in lines[0], lines
