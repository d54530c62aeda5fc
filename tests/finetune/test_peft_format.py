"""Adapter folders in peft's format: ours load with PeftModel.from_pretrained onto the transformers export with the
same logits, peft's load onto our model, and an adapter meets one clear error on any other base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from lmforge.errors import LmforgeError
from lmforge.finetune.methods import PeftConfig, tune
from lmforge.finetune.peft_format import load_adapter, save_adapter
from lmforge.interop.hf import to_transformers
from lmforge.models import ModelConfig, build_model

X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dora", [False, True])
def test_our_adapter_loads_into_peft(dora, tmp_path, make_base, randomize):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="lora", targets=["q", "v", "gate", "lm_head"], rank=4, dora=dora))
    randomize(tuned)
    save_adapter(tuned, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "lmforge_base.json").read_text())["hash"] == tuned.base_hash
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (pm(input_ids=X).logits - tuned.logits(X)).abs().max() <= 1e-5


def test_peft_adapter_loads_into_ours(tmp_path, make_base, randomize):
    hf = to_transformers(make_base())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"], use_rslora=True)
    pm = get_peft_model(hf, config)
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft")
    tuned = load_adapter(make_base(), tmp_path / "peft")
    assert sorted(tuned.cfg.targets) == ["down", "k", "proj"] and tuned.cfg.rslora
    with torch.no_grad():
        assert (pm(input_ids=X).logits - tuned.logits(X)).abs().max() <= 1e-5


def test_another_base_is_refused(tmp_path, make_base):
    tuned = tune(make_base(), PeftConfig(method="lora", targets=["q"], rank=2))
    save_adapter(tuned, tmp_path / "a")
    with pytest.raises(LmforgeError, match="another base model"):
        load_adapter(make_base(seed=5), tmp_path / "a")  # same shapes, other weights: the hash tells
    (tmp_path / "a" / "lmforge_base.json").unlink()  # as peft writes it: then shapes are all there is to check
    with pytest.raises(LmforgeError, match="another base model"):
        load_adapter(make_base(dim=32, n_heads=2, n_kv_heads=2), tmp_path / "a")


def test_gpt2_has_no_peft_form(tmp_path):
    gpt2 = build_model(
        ModelConfig(
            vocab_size=256,
            dim=32,
            n_heads=2,
            n_kv_heads=2,
            pos="learned",
            norm="layernorm",
            mlp="gelu",
            bias=True,
            tie_embeddings=True,
        )
    )
    tuned = tune(gpt2, PeftConfig(method="lora", targets=["q"]))
    with pytest.raises(LmforgeError, match="c_attn"):
        save_adapter(tuned, tmp_path / "a")
