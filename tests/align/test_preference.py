"""The DPO family: packed log-probabilities equal padded ones; through `lmforge align`, every loss trains and reports,
the implicit reward learns an easy preference with LoRA, a resumed run ends on the uninterrupted run's weights
exactly, two torchrun ranks match one process on the same global batch, and user errors exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import cli
from lmforge.align.pairs import pack_sequences
from lmforge.align.preference import sequence_logps
from lmforge.align.sequences import make_batch, reply_logprobs
from lmforge.checkpoint import load_run, save_checkpoint
from lmforge.models import ModelConfig, build_model
from lmforge.run import Run
from lmforge.tokenizer import Tokenizer

REPO = Path(__file__).parent.parent.parent


def easy_pairs(path: Path, n: int = 48) -> Path:
    """Chosen replies state an answer; rejected ones are the same refusal: a preference a tiny model learns fast."""
    rows = [
        {"prompt": f"What is {i} plus {i + 1}?", "chosen": f"The answer is {2 * i + 1}.", "rejected": "def f(x): pass"}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def align(tmp_path: Path, policy: Path, name: str, *overrides: str, resume: bool = False) -> Run:
    args = ["align", "--config", str(REPO / "configs/align/dpo.yaml"), f"policy={policy}", f"run.root={tmp_path}"]
    args += [f"run.name={name}", f"data.path={easy_pairs(tmp_path / 'easy.jsonl')}", "data.format=pairs"]
    args += ["train.batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.device=cpu", "train.lr=1e-3"]
    args += ["data.val_fraction=0.25", "train.eval_every=0", *overrides]
    cli.main(args + (["--resume"] if resume else []))
    return Run(tmp_path / name)


def test_packed_log_probs_equal_each_padded_sequence(tiny_run):
    model, tok = load_run(tiny_run)
    prompts = [tok.encode(t, bos=True) for t in ("def f(x):", "The quick brown", "import", "class A:")]
    replies = [tok.encode(t) for t in (" return x", " fox jumps over the lazy dog", " os, sys", " pass")]
    want = reply_logprobs(model, make_batch(prompts, replies, tok.pad_id)).sum(-1)
    packed = pack_sequences(prompts, replies, tok.pad_id, context=24)
    assert packed.x.shape[0] < len(prompts)  # several sequences share a row
    torch.testing.assert_close(sequence_logps(model, packed), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "kto", "orpo", "simpo"])
def test_every_loss_trains_and_reports(tmp_path, tiny_run, loss):
    run = align(tmp_path, tiny_run, loss, f"dpo.loss={loss}", "train.steps=2")
    summary = run.read_json("align.json")
    assert summary["loss"] == loss and summary["training"]["steps"] == 2
    rows = [r for r in run.read_metrics("align") if "loss" in r]
    assert len(rows) == 2 and all(k in rows[0] for k in ("rewards_chosen", "rewards_rejected", "margin", "lr"))
    assert "align" in (run.path / "report.md").read_text()


def test_the_implicit_reward_learns_an_easy_preference_with_lora(tmp_path, tiny_run):
    run = align(tmp_path, tiny_run, "lora", "peft.method=lora", "train.steps=8", "train.lr=1e-2")
    t = run.read_json("align.json")["training"]
    assert t["val_accuracy_before"] == 0.5  # the policy is its own reference: every margin ties (half each)
    assert t["val_accuracy_after"] == 1.0 and t["val_margin_after"] > 0.05
    losses = [r["loss"] for r in run.read_metrics("align") if "loss" in r]
    assert losses[-1] < losses[0] - 0.05


def test_a_resumed_run_ends_on_the_uninterrupted_weights(tmp_path, tiny_run):
    run = align(tmp_path, tiny_run, "r", "train.steps=4", "train.ckpt_every=2")
    last = run.path / "checkpoints/step_000004"
    want = torch.load(last / "finetune_state.pt", weights_only=True)
    shutil.rmtree(last)  # as if the run had stopped after step 2
    align(tmp_path, tiny_run, "r", "train.steps=4", "train.ckpt_every=2", resume=True)
    got = torch.load(last / "finetune_state.pt", weights_only=True)
    assert got["trainable"].keys() == want["trainable"].keys() and got["loader"] == want["loader"]
    for name, tensor in want["trainable"].items():
        assert torch.equal(got["trainable"][name], tensor), name


def test_errors_exit_2(tmp_path, tiny_run, tiny_text, capsys):
    other = tmp_path / "other"  # a reference with its own (smaller) vocabulary
    tokenizer = Tokenizer.train([tiny_text[i : i + 2000] for i in range(0, 40_000, 2000)], vocab_size=300)
    tokenizer.save(other)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=128
    )
    save_checkpoint(other, 0, build_model(cfg, seed=0), state={})
    cases = {
        "another vocabulary": [f"reference={other}", "train.steps=1"],
        "no resumable checkpoint": ["train.steps=1", "--resume"],
        "needs data.path": ["data.path=", "train.steps=1"],
    }
    for message, extra in cases.items():
        resume = "--resume" in extra
        with pytest.raises(SystemExit) as e:
            align(tmp_path, tiny_run, "bad", *[x for x in extra if x != "--resume"], resume=resume)
        assert e.value.code == 2 and message in capsys.readouterr().err, message


def test_two_ranks_match_one_rank_with_the_doubled_batch(tmp_path, tiny_run):
    data = easy_pairs(tmp_path / "easy.jsonl")
    common = ["align", "--config", str(REPO / "configs/align/dpo.yaml"), f"policy={tiny_run}", f"data.path={data}"]
    common += ["data.format=pairs", "train.steps=2", "train.grad_accum=2", "train.log_every=1", "train.lr=1e-3"]
    common += ["train.device=cpu", f"run.root={tmp_path}", "peft.method=lora"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv = [*launcher, "-m", "lmforge", *common, "run.name=two", "train.batch_size=2"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cli.main([*common, "run.name=one", "train.batch_size=4"])  # in this process: one interpreter start fewer
    one, two = Run(tmp_path / "one"), Run(tmp_path / "two")
    a, b = ([r["loss"] for r in run.read_metrics("align") if "loss" in r] for run in (two, one))
    assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-5)
    a, b = (torch.load(r.path / "checkpoints/step_000002/finetune_state.pt", weights_only=True) for r in (two, one))
    for name in b["trainable"]:
        torch.testing.assert_close(a["trainable"][name], b["trainable"][name], rtol=1e-4, atol=1e-5, msg=name)
