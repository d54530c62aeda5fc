"""method=nf4: a run holds its block linears as NF4 and loads back with the very weights it saved."""

from __future__ import annotations

import torch

from lmforge import cli
from lmforge.checkpoint import load_run
from lmforge.compress.modules import densify
from lmforge.finetune.nf4 import NF4Linear, dequantize_nf4, quantize_nf4


def test_nf4_run_saves_and_loads_equal_weights(tiny_run, tmp_path):
    cli.main(["compress", str(tiny_run), "method=nf4", f"run.root={tmp_path}", "run.name=n"])
    base, _ = load_run(tiny_run)
    model, _ = load_run(tmp_path / "n")
    assert model.compression["method"] == "nf4"
    layer = model.layers[1].attn.qkv
    assert isinstance(layer, NF4Linear) and isinstance(model.lm_head, torch.nn.Linear)
    w = base.layers[1].attn.qkv.weight.detach()
    packed, absmax = quantize_nf4(w)
    assert torch.equal(layer.packed, packed)
    # double quantisation rounds the absmax values too: the loaded weight is the NF4 codes at those scales
    torch.testing.assert_close(layer.weight, dequantize_nf4(packed, absmax, w.shape), rtol=0.02, atol=1e-3)
    assert torch.equal(layer.weight, NF4Linear(base.layers[1].attn.qkv).weight)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    torch.testing.assert_close(densify(model)(ids), logits)
    assert (logits - base(ids)).abs().mean() < 0.1 * base(ids).abs().mean()
