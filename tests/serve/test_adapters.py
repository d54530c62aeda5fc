"""LoRA adapters served per request: adapters saved by the real `peft` library on our transformers export, several in
one engine step, each request's tokens equal to those of peft's merged model served alone."""

import copy

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lmforge.checkpoint import load_run
from lmforge.cli import main as cli_main
from lmforge.errors import LmforgeError
from lmforge.interop.hf import import_hf, to_transformers
from lmforge.models import ModelConfig, build_model
from lmforge.sampling import SamplingParams
from lmforge.serve.adapters import AdapterSet
from lmforge.serve.engine import Engine, EngineConfig
from lmforge.serve.server import build_app

ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "mlp": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj", "down_proj"]),
}
PROMPTS = ["def parse(", "import os\nimport sys\n", "class Stack:\n    def push(self, item):\n"]


def _peft_adapter(model, tokenizer, folder, seed: int, **lora):
    """Save a random (non-zero) peft LoRA of `model`'s export to `folder`; return peft's merged model as our run."""
    hf = to_transformers(copy.deepcopy(model), tokenizer)
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # large enough that the adapters change greedy tokens
    peft_model.save_pretrained(folder)
    peft_model.merge_and_unload().save_pretrained(folder / "merged")
    run = import_hf(folder / "merged", folder / "merged_run")
    tokenizer.save(run)
    return load_run(run)[0]


@pytest.fixture(scope="module")
def adapted(tiny_run, tmp_path_factory):
    base, tokenizer = load_run(tiny_run)
    root = tmp_path_factory.mktemp("adapters")
    merged = {0: base}
    for i, (name, lora) in enumerate(ADAPTERS.items(), start=1):
        merged[i] = _peft_adapter(base, tokenizer, root / name, seed=i, **lora)
    return tiny_run, root, merged


def _served(tiny_run, root):
    model, tokenizer = load_run(tiny_run)
    adapters = AdapterSet(model)
    for name in ADAPTERS:
        adapters.load(name, root / name)
    return Engine(model, tokenizer, EngineConfig(block_size=8, backend="torch"), adapters=adapters), tokenizer


def _alone(model, tokenizer, prompt, params) -> list[int]:
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, backend="torch"))
    return engine.generate([prompt], params)[0].token_ids


def test_requests_of_different_adapters_in_one_step_equal_the_merged_models(adapted):
    tiny_run, root, merged = adapted
    engine, tokenizer = _served(tiny_run, root)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = [tokenizer.encode(p, bos=True) for p in PROMPTS]
    wanted = {(p, a): _alone(merged[a], tokenizer, prompts[p], params) for p in range(len(prompts)) for a in merged}
    assert len({tuple(v) for k, v in wanted.items() if k[0] == 0}) == 3, "the adapters must change the tokens"
    steps, run = [], engine.runner.run
    engine.runner.run = lambda chunks, all_rows: steps.append({c.adapter for c in chunks}) or run(chunks, all_rows)
    for _ in range(2):  # the second round finds the first round's blocks in the prefix cache: never another adapter's
        got: dict[tuple[int, int], list[int]] = {}
        for p, a in wanted:
            engine.add(f"{p}-{a}", prompts[p], params, adapter=a)
        while engine.has_work():
            for out in engine.step():
                p, a = map(int, out.request_id.split("-"))
                got.setdefault((p, a), []).extend(out.token_ids)
        assert got == wanted
    assert {0, 1, 2} in steps  # one step batched all three


def test_server_routes_the_model_field_to_its_adapter(adapted, live_server):
    tiny_run, root, merged = adapted
    engine, tokenizer = _served(tiny_run, root)
    app = build_app(engine, "tiny")
    params = SamplingParams(max_tokens=8, temperature=0.0)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "qv", "mlp"]
        for name, index in (("tiny", 0), ("qv", 1), ("mlp", 2)):
            body = {"model": name, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
            text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            want = _alone(merged[index], tokenizer, tokenizer.encode(PROMPTS[1], bos=True), params)
            assert text == tokenizer.decode(want)
        missing = client.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
        assert missing.status_code == 404 and "qv" in missing.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # and it keeps serving


def test_adapter_for_another_base_is_refused(adapted, tmp_path, tiny_tokenizer):
    tiny_run, root, _ = adapted
    other = build_model(ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64), seed=1)
    _peft_adapter(other, tiny_tokenizer, tmp_path / "other", seed=3, r=2, lora_alpha=2, target_modules=["q_proj"])
    model, _ = load_run(tiny_run)
    with pytest.raises(LmforgeError, match="another base"):
        AdapterSet(model).load("other", tmp_path / "other")
    with pytest.raises(LmforgeError, match="not a LoRA adapter folder"):
        AdapterSet(model).load("empty", tmp_path)


def test_serve_cli_refuses_a_malformed_lora_flag(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", str(tiny_run), "--lora", "no-equals-sign"])
    assert exit_info.value.code == 2 and "NAME=DIR" in capsys.readouterr().err
