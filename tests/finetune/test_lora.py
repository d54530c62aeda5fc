"""LoRA: merge and unmerge are exact inverses and change no output, the merged plain decoder computes the same, DoRA's
merge equals peft's, LoRA+ groups match peft's create_loraplus_optimizer, and wrong targets fail with one error."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer

from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoraLinear
from lmforge.finetune.methods import PeftConfig, tune
from lmforge.interop.hf import to_transformers
from lmforge.models import build_model

ALL = ["q", "k", "v", "proj", "gate", "up", "down", "lm_head"]
X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_and_merged_decoder(dora, make_base, randomize):
    model = make_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = tune(model, PeftConfig(method="lora", targets=["q", "v", "up", "down"], rank=4, dora=dora))
    randomize(tuned)
    with torch.no_grad():
        out = tuned.logits(X)
        plain = tuned.merged()
        assert set(plain.state_dict()) == set(before)  # a plain Decoder's weights, names and all
        assert (plain(X) - out).abs().max() < 1e-5
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        for m in layers:
            m.merge()
        assert (tuned.logits(X) - out).abs().max() < 1e-5
        for m in layers:
            m.unmerge()
        assert (tuned.logits(X) - out).abs().max() < 1e-5
    for m in layers:
        path = next(k for k, v in model.named_modules() if v is m)
        assert (m.base.weight - before[path + ".weight"]).abs().max() < 1e-6


def test_dora_merge_equals_peft(make_base, randomize):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="lora", targets=["q", "down"], rank=4, alpha=8.0, dora=True))
    randomize(tuned)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for i in range(2):
            qkv, down = model.layers[i].attn.qkv, model.layers[i].mlp.down
            for hf_name, m, s in (("self_attn.q_proj", qkv, "q"), ("mlp.down_proj", down, "down")):
                where = f"base_model.model.model.layers.{i}.{hf_name}"
                params[f"{where}.lora_A.default.weight"].copy_(m.lora_A[s])
                params[f"{where}.lora_B.default.weight"].copy_(m.lora_B[s])
                params[f"{where}.lora_magnitude_vector.default.weight"].copy_(m.magnitude[s])
        theirs = pm.merge_and_unload().state_dict()
        ours = tuned.merged().state_dict()
    q = model.cfg.n_heads * model.cfg.head_dim
    for i in range(2):
        wq = ours[f"layers.{i}.attn.qkv.weight"][:q]
        assert (wq - theirs[f"model.layers.{i}.self_attn.q_proj.weight"]).abs().max() < 1e-6
        wd = ours[f"layers.{i}.mlp.down.weight"]
        assert (wd - theirs[f"model.layers.{i}.mlp.down_proj.weight"]).abs().max() < 1e-6


def test_rslora_scale(make_base):
    tuned = tune(make_base(), PeftConfig(method="lora", targets=["q"], rank=16, alpha=8.0, rslora=True))
    assert tuned.model.layers[0].attn.qkv.scale == 8.0 / 4


def test_loraplus_groups_match_peft(make_base):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="lora", targets=ALL, rank=4, dora=True, loraplus_ratio=16.0))
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_dora=True))
    # peft splits by names: lora_B and 1-D tensors (DoRA's magnitudes) at lr * ratio, the rest at lr
    theirs = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0).param_groups
    ours = tuned.param_groups(1e-3)
    assert sorted(g["lr"] for g in ours) == sorted({g["lr"] for g in theirs if g["params"]}) == [1e-3, 1.6e-2]
    fast = next(g for g in ours if g["lr"] > 1e-3)["params"]
    names = {id(p): n for n, p in tuned.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in fast} == {"lora_B", "magnitude"}
    assert len(fast) + len(next(g for g in ours if g["lr"] == 1e-3)["params"]) == len(tuned.trainable_state())


def test_only_lora_weights_train_and_state_round_trips(make_base, randomize):
    tuned = tune(make_base(), PeftConfig(method="lora", targets=["q", "v"], rank=2))
    names = list(tuned.trainable_state())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    randomize(tuned)
    state = {k: v.clone() for k, v in tuned.trainable_state().items()}
    again = tune(make_base(), PeftConfig(method="lora", targets=["q", "v"], rank=2))
    again.load_trainable_state(state)
    assert torch.equal(again.logits(X), tuned.logits(X))
    with pytest.raises(LmforgeError, match="do not fit"):
        tune(make_base(), PeftConfig(method="lora", targets=["q"], rank=2)).load_trainable_state(state)


def test_unknown_target_names_the_choices(make_base):
    with pytest.raises(LmforgeError, match=r"\['wq'\].*q, k, v, proj, gate, up, down, lm_head"):
        tune(make_base(), PeftConfig(method="lora", targets=["q", "wq"]))
    gpt2 = build_model(make_base().cfg.__class__(vocab_size=256, dim=32, n_heads=2, n_kv_heads=2, mlp="gelu"))
    with pytest.raises(LmforgeError, match="gate"):
        tune(gpt2, PeftConfig(method="lora", targets=["gate"]))
    tied = build_model(make_base().cfg.__class__(vocab_size=256, dim=32, n_heads=2, tie_embeddings=True))
    with pytest.raises(LmforgeError, match="ties"):
        tune(tied, PeftConfig(method="lora", targets=["lm_head"]))
