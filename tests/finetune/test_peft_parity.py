"""Our LoRA (plain, DoRA, rsLoRA), prefix tuning, prompt tuning and P-tuning against peft's on the transformers export
of the same model: with the same trainable weights, the same logits and the same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

from lmforge.finetune.methods import PeftConfig, tune
from lmforge.finetune.peft_format import peft_tensors
from lmforge.interop.hf import to_transformers

P = 5
ALL = ["q", "k", "v", "proj", "gate", "up", "down", "lm_head"]
HF_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _compare(tuned, peft_model, ours_to_peft: dict[str, str], prompt_rows: int = 0):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 256, (2, 11), generator=g), torch.randint(0, 256, (2, 11), generator=g)
    ours = tuned.logits(x)
    theirs = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, prompt_rows:]
    assert (ours - theirs).abs().max() <= 1e-5
    assert len(ours_to_peft) == sum(p.requires_grad for p in tuned.parameters()) > 0
    F.cross_entropy(ours.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), y.flatten()).backward()
    params = dict(peft_model.named_parameters())
    for name, p in tuned.named_parameters():
        if p.requires_grad:
            assert (p.grad - params[ours_to_peft[name]].grad).abs().max() <= 1e-5, name


@pytest.mark.parametrize("variant", [{}, {"dora": True}, {"rslora": True}])
def test_lora_matches_peft(variant, make_base, randomize):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="lora", targets=ALL, rank=4, alpha=8.0, **variant))
    randomize(tuned)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=HF_ALL, use_dora=variant.get("dora", False), use_rslora="rslora" in variant
    )
    pm = get_peft_model(hf, cfg)
    params = dict(pm.named_parameters())
    ours_by_peft = peft_tensors(tuned)
    theirs = {}
    with torch.no_grad():
        for name, t in ours_by_peft.items():
            head, _, tail = name.rpartition(".") if "magnitude" not in name else (name, "", "")
            peft_name = f"{head}.default.{tail}" if tail else f"{head}.default.weight"
            params[peft_name].copy_(t)
            theirs[t.data_ptr()] = peft_name
    mapping = {n: theirs[p.data_ptr()] for n, p in tuned.named_parameters() if p.requires_grad}
    _compare(tuned, pm, mapping)


def _copy_prompt(tuned, pm) -> dict[str, str]:
    params = dict(pm.named_parameters())
    mapping = {n: "prompt_encoder.default." + n.removeprefix("encoder.") for n, p in tuned.named_parameters()}
    mapping = {n: m for n, m in mapping.items() if n.startswith("encoder.")}
    with torch.no_grad():
        for ours, theirs in mapping.items():
            params[theirs].copy_(tuned.get_parameter(ours))
    return mapping


@pytest.mark.parametrize("hidden", [0, 24])
def test_prefix_tuning_matches_peft(hidden, make_base):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="prefix", virtual_tokens=P, prefix_hidden=hidden))
    kw = dict(prefix_projection=True, encoder_hidden_size=hidden) if hidden else {}
    pm = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw))
    _compare(tuned, pm, _copy_prompt(tuned, pm))


def test_prompt_tuning_matches_peft(make_base):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="prompt", virtual_tokens=P))
    pm = get_peft_model(hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    _compare(tuned, pm, _copy_prompt(tuned, pm), prompt_rows=P)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_matches_peft(encoder, make_base):
    model = make_base()
    hf = to_transformers(model)
    tuned = tune(model, PeftConfig(method="ptuning", virtual_tokens=P, encoder=encoder, encoder_hidden=32))
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        encoder_hidden_size=32,
        encoder_reparameterization_type=encoder.upper(),
    )
    pm = get_peft_model(hf, config)
    _compare(tuned, pm, _copy_prompt(tuned, pm), prompt_rows=P)
