"""`lmforge finetune` end to end on a tiny model: packing leaves each example's loss alone, resume is bit-identical,
bad records are counted, usage errors exit 2 before anything is written, and a fine-tuned model ends its answers at
the end-of-turn token in lmforge and in transformers on the export."""

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lmforge.checkpoint import checkpoint_dirs, load_model, load_run
from lmforge.cli import main, run_stage
from lmforge.config import load_config
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.methods import PeftConfig, tune
from lmforge.finetune.packing import pack
from lmforge.finetune.template import IGNORE, encode_example, shifted
from lmforge.models import ModelConfig, build_model

REPO = Path(__file__).parent.parent.parent
ALPACA = REPO / "tests/fixtures/alpaca_20.json"
QA = [
    ("Name a colour.", "Blue."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello!"),
    ("Which animal barks?", "A dog."),
    ("What do cows drink?", "Water."),
]


def finetune(tmp_path, base, name, *overrides, resume=False):
    args = [f"base={base}", f"run.root={tmp_path}", f"run.name={name}", "train.device=cpu", *overrides]
    return run_stage("finetune", None, args, resume)


def test_the_shipped_config_loads(tiny_run):
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/sft.yaml", [f"base={tiny_run}", f"data.path={ALPACA}"])
    assert cfg.data.format == "alpaca" and cfg.data.packing and cfg.peft.method == "full" and cfg.train.steps == 200


def test_packed_examples_keep_their_own_loss(tiny_tokenizer):
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    tuned = tune(build_model(cfg, seed=0).eval(), PeftConfig())
    a, b, c = (shifted(*encode_example(tiny_tokenizer, [{"role": "user", "content": q}, {"role": "assistant",
               "content": r}])) for q, r in QA[:3])  # fmt: skip
    quiet = [(x, [IGNORE] * len(y)) for x, y in (b, c)]  # neighbours without targets: only a's loss counts
    with torch.no_grad():
        alone = tuned.loss(*pack([a], 64, tiny_tokenizer.pad_id, True))
        for examples in ([a, quiet[0]], [quiet[1], a], [quiet[0], a, quiet[1]]):
            x, y, seg = pack(examples, 64, tiny_tokenizer.pad_id, True)
            assert x.shape == (1, 64) and seg.max() == len(examples) - 1
            torch.testing.assert_close(tuned.loss(x, y, seg), alone, rtol=0, atol=1e-6)
        x, y, seg = pack([quiet[1], a], 64, tiny_tokenizer.pad_id, True)
        assert (tuned.loss(x, y) - alone).abs() > 1e-4  # without the segments the neighbour leaks in (can fail)
        # one example per row, padded: the same tokens and targets, padding never trained
        x, y, seg = pack([a, b, c], 64, tiny_tokenizer.pad_id, False)
        assert x.shape == (3, 64) and ((seg < 0) == (x == tiny_tokenizer.pad_id)).all()
        assert (y[seg < 0] == IGNORE).all() and [int((s >= 0).sum()) for s in seg] == [len(e[0]) for e in (a, b, c)]
        packed = pack([a, b, c], 64, tiny_tokenizer.pad_id, True)
        torch.testing.assert_close(tuned.loss(x, y), tuned.loss(*packed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "ptuning"])
def test_resume_continues_bit_identically(tmp_path, tiny_run, method, capsys):
    overrides = [f"data.path={ALPACA}", f"peft.method={method}", "train.steps=4", "train.ckpt_every=2",
                 "train.keep_last=3", "train.log_every=1", "train.batch_size=2", "train.lr=1e-3",
                 "train.samples=0", "data.seq_len=96"]  # fmt: skip
    straight = finetune(tmp_path, tiny_run, "straight", *overrides)
    assert "step      4/4" in capsys.readouterr().out
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    folder = "checkpoints" if method in ("full", "freeze", "lora", "qlora") else "tuning"
    shutil.rmtree(tmp_path / f"resumed/{folder}/step_000004")
    resumed = finetune(tmp_path, tiny_run, "resumed", *overrides, resume=True)
    assert "resumed from" in capsys.readouterr().out
    assert resumed["val_loss_after"] == straight["val_loss_after"] and resumed["train_loss"] == straight["train_loss"]
    a, b = (torch.load(tmp_path / r / folder / "step_000004/finetune_state.pt", weights_only=True)["trainable"]
            for r in ("straight", "resumed"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if folder == "tuning":
        return
    if method == "lora":  # and its peft adapter folder
        assert (tmp_path / "straight/adapter/adapter_config.json").is_file()
    a, b = (safetensors.torch.load_file(tmp_path / r / "checkpoints/step_000004/model.safetensors")
            for r in ("straight", "resumed"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_model(tiny_run).state_dict()
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed and (method != "freeze" or all(k.startswith(("layers.1.", "norm.")) for k in changed))


def test_bad_records_are_counted_and_reported(tmp_path, tiny_run, capsys):
    data = tmp_path / "mixed.jsonl"
    good = [{"prompt": q, "completion": r} for q, r in QA]
    bad = [{"prompt": "no completion"}, "a string", {"prompt": "long " * 300, "completion": "x"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in [*good, *bad]) + "{broken\n")
    overrides = [f"data.path={data}", "data.format=prompt_completion", "data.packing=false", "train.steps=1"]
    metrics = finetune(tmp_path, tiny_run, "mixed", *overrides)
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "mixed/finetune.json").read_text())
    assert summary["data"]["rows"] == summary["data"]["train_conversations"] == 4  # one per row, unpacked
    assert metrics["rejected"] == 4 and "## finetune" in (tmp_path / "mixed/report.md").read_text()
    rejected = summary["data"]["rejected"]
    assert rejected == {
        "malformed: 'completion' missing or not text": 1,
        "malformed: not a JSON object": 2,
        "longer than the context (129 tokens)": 1,
    }
    assert "rejected: 1 longer than the context (129 tokens), 1 malformed: 'completion'" in out
    assert "<|assistant|>[[" in out and "<|end|>]]" in out  # the example shown with its trained span marked


@pytest.mark.parametrize(
    "args, message",
    [
        (["base=no-such-run"], "run 'no-such-run' not found"),
        (["data.format=csv"], "data.format='csv' is not a valid choice"),
        (["data.path=/no/such.json"], "data.path='/no/such.json' is not a file"),
        (["peft.method=magic"], "peft.method='magic' is not a valid choice"),
        (["data.path=EMPTY"], "leaves 0 training and 0 held-out conversations (1 no assistant turn)"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_run, monkeypatch, capsys, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    monkeypatch.chdir(tmp_path)
    defaults = [f"base={tiny_run}", f"data.path={ALPACA}", "data.format=messages"]
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", *defaults, *(a.replace("EMPTY", str(empty)) for a in args)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_finetuned_answers_end_at_end_of_turn_in_lmforge_and_transformers(tmp_path, tiny_run):
    transformers = pytest.importorskip("transformers")
    from lmforge.interop.hf import export_hf
    from lmforge.sampling import generate_tokens

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"prompt": q, "completion": r} for q, r in QA]))
    finetune(tmp_path, tiny_run, "qa", f"data.path={data}", "data.format=prompt_completion", "data.val_fraction=0.2",
             "train.steps=40", "train.lr=5e-3", "train.schedule=constant", "train.warmup_steps=0", "train.log_every=40",
             "train.samples=1", "train.max_new_tokens=8")  # fmt: skip
    run = tmp_path / "qa"
    summary = json.loads((run / "finetune.json").read_text())
    held_out = {s["reference"] for s in summary["samples"]}
    assert summary["training"]["train_loss"] < 0.1  # memorised (the held-out loss rises, as it should here)
    model, tok = load_run(run)
    end = tok.token_id("<|end|>")
    trained = [(q, r) for q, r in QA if r not in held_out]
    assert len(checkpoint_dirs(run)) == 1 and len(trained) == 4
    export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert end in hf.generation_config.eos_token_id
    for question, answer in trained:
        prompt = [{"role": "user", "content": question}]
        ids = tok.encode_chat(prompt, add_generation_prompt=True, bos=True)
        ours = list(generate_tokens(model, ids, 12))  # no stop ids: the model itself must close the turn
        assert ours[: ours.index(end) + 1] == tok.encode_plain(answer) + [end], tok.decode(ours)
        hf_ids = hf_tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert hf_ids == ids
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([hf_ids]), do_sample=False, max_new_tokens=12)[0, len(ids) :].tolist()
        assert theirs == tok.encode_plain(answer) + [end]
