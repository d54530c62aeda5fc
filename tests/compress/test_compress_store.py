"""Round-to-nearest int8/int4 and the compressed run folder: codes against torch's own fake quantization, save and
load with equal logits, what the run remembers, and the errors (corrupt weights, another tokenizer, bad options)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.cli import main
from lmforge.compress import rtn
from lmforge.compress.modules import QuantLinear, densify, pack_codes, unpack_codes
from lmforge.errors import LmforgeError


@pytest.mark.parametrize("bits, group_size, symmetric", [(8, 0, True), (4, 32, True), (4, 16, False), (8, 32, False)])
def test_rtn_equals_torch_fake_quantization(bits, group_size, symmetric):
    w = torch.randn(24, 64) * torch.linspace(0.1, 3, 64)  # columns of different ranges, as real weights have
    codes, scales, zeros = rtn.quantize_weight(w, bits, group_size, symmetric)
    size = group_size or 64
    groups = w.reshape(-1, size)
    reference = torch.fake_quantize_per_channel_affine(
        groups, scales.reshape(-1), zeros.reshape(-1).int(), 0, 0, 2**bits - 1
    ).reshape(24, 64)
    layer = QuantLinear.from_codes(codes, scales, zeros, bits)
    # torch multiplies by 1 / scale where we divide (compressed-tensors' way): they may differ only at exact ties
    ratio = (groups / scales.reshape(-1, 1)).reshape(24, 64)
    tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4
    differ = (layer.weight - reference).abs() > 1e-6
    assert not torch.any(differ & ~tie) and differ.sum() <= tie.sum()
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    if symmetric:  # the grid is centred: the largest magnitude of each group lands within half a step
        assert torch.all(zeros == 2 ** (bits - 1))
    err = (layer.weight - w).abs().reshape(-1, size).amax(1)
    assert torch.all(err <= scales.reshape(-1) * 0.5 + 1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_observer_picks_the_least_error_shrink(symmetric):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 2, 256)[:, None]
    codes, scales, zeros = rtn.quantize_weight(w, 4, 64, symmetric, observer="mse")
    w_hat = QuantLinear.from_codes(codes, scales, zeros, 4).weight

    def error(shrink: float) -> torch.Tensor:  # each group's sum |w - w_hat|^norm on torch's fake quantization
        scale, zero = rtn.range_params(shrink * w.amin(1).clamp(max=0), shrink * w.amax(1).clamp(min=0), 4, symmetric)
        fake = torch.fake_quantize_per_channel_affine(w, scale, zero.int(), 0, 0, 15)
        return (fake - w).abs().pow(rtn.MSE_NORM).sum(1)

    # with this many groups some group improves at every step, so the search runs its whole range
    tried = torch.stack([error(1 - i / rtn.MSE_GRID) for i in range(int(rtn.MSE_MAXSHRINK * rtn.MSE_GRID))])
    ours = (w_hat - w).abs().pow(rtn.MSE_NORM).sum(1)
    torch.testing.assert_close(ours, tried.amin(0), rtol=1e-4, atol=1e-6)
    assert torch.all(ours <= tried[0] + 1e-6)  # never worse than minmax (shrink 1)
    assert (ours < tried[0]).float().mean() > 0.5  # most groups round better clipped a little
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    with pytest.raises(LmforgeError, match="observer"):
        rtn.quantize_weight(w, 4, 64, symmetric, observer="percentile")


def test_4bit_codes_pack_two_to_a_byte():
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (3, 5) and int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4
    assert torch.equal(unpack_codes(packed, 4), codes)


def compress(tmp_path, base, name, *overrides):
    main(["compress", str(base), *overrides, f"run.root={tmp_path}", f"run.name={name}"])
    return tmp_path / name


@pytest.mark.parametrize("method, size_ratio", [("int8", 0.5), ("int4", 0.4)])
def test_a_compressed_run_loads_back_with_the_logits_it_had(tmp_path, tiny_run, method, size_ratio):
    out = compress(tmp_path, tiny_run, f"tiny-{method}", f"method={method}", "quant.group_size=32", "quant.head=true")
    model, tokenizer = load_run(out)
    base, _ = load_run(tiny_run)
    reference = densify(load_run(tiny_run)[0])  # the base quantized in memory, the same way
    rtn.quantize_rtn(reference, 8 if method == "int8" else 4, 32, True, head=True)
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)
        drift = (model(ids) - base(ids)).abs().max()
    assert 0 < drift < (0.05 if method == "int8" else 0.5)
    assert all(type(m) is QuantLinear for n, m in model.named_modules() if n.startswith("layers.") and "attn." in n)
    remembered = json.loads((latest_checkpoint(out) / "compression.json").read_text())
    assert remembered["method"] == method and remembered["base"] == str(tiny_run.resolve())
    summary = json.loads((out / "compress.json").read_text())
    assert summary["size_bytes"] < size_ratio * summary["base_size_bytes"]  # the float embedding table stays


def test_a_corrupt_or_mismatched_compressed_run_is_refused(tmp_path, tiny_run, tiny_tokenizer, capsys):
    out = compress(tmp_path, tiny_run, "tiny-int8", "method=int8")
    weights = latest_checkpoint(out) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of one code
    shutil.copy(weights, tmp_path / "intact.safetensors")
    weights.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="does not match the hash"):
        load_run(out)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", str(out), "--prompt", "x"])
    assert exit_.value.code == 2 and "does not match the hash" in capsys.readouterr().err
    shutil.copy(tmp_path / "intact.safetensors", weights)
    load_run(out)
    other = json.loads((out / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, another vocabulary
    (out / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(LmforgeError, match="not the tokenizer"):
        load_run(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=int4", "quant.group_size=48"], "quant.group_size=48 does not divide"),
        (["method=gptq"], "needs calibration text; give calibration.path"),
        (["method=squeeze"], "method='squeeze' is not a method"),
        (["quant.bits=3"], "quant.bits=3 must be 4 or 8"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(tmp_path, tiny_run, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(tiny_run), *args, f"run.root={tmp_path}", "run.name=out"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_compressed_run_is_not_compressed_again(tmp_path, tiny_run, capsys):
    out = compress(tmp_path, tiny_run, "tiny-int8", "method=int8")
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(out), "method=int4", f"run.root={tmp_path}", "run.name=again"])
    assert exit_.value.code == 2 and "already compressed (int8)" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_a_quantized_run_exports_to_transformers_and_fine_tunes_dequantized(tmp_path, tiny_run):
    import transformers

    from lmforge.interop.hf import export_hf

    out = compress(tmp_path, tiny_run, "tiny-int4", "method=int4", "quant.group_size=32")
    export_hf(out, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    model, tokenizer = load_run(out)
    dense, _ = load_run(out, dense=True)
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dense(ids), model(ids), rtol=1e-5, atol=1e-5)
