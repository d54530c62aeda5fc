"""The CLI surface: verbs, usage errors (exit 2, one line, nothing written), and the README's commands at tiny scale."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import TOOLS, VERBS, build_parser, main


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_the_verbs_do_not_change_by_accident():
    assert sorted(VERBS) == ["align", "finetune", "pretrain", "speedrun"]
    assert sorted(TOOLS) == [
        "arena",
        "chat",
        "compress",
        "data",
        "eval",
        "export",
        "generate",
        "import",
        "plan",
        "report",
        "serve",
        "tokenizer",
    ]
    help_text = build_parser().format_help()
    for verb in [*VERBS, *TOOLS]:
        assert verb in help_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["pretrain", "train.setps=3"], "unknown config key train.setps; did you mean train.steps?"),
        (["pretrain", "model.n_heads=3"], "model.n_heads=3 must divide model.dim=64"),
        (["speedrun", "depth=0"], "depth=0 must be in 1..48"),
        (["pretrain", "--config", "nope.yaml"], "config file nope.yaml does not exist"),
        (["generate", "no-such-run", "--prompt", "x"], "run 'no-such-run' not found"),
        (["pretrain", "data.path=/no/such/folder", "train.steps=1"], "/no/such/folder"),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)  # in-process (a subprocess per case spends ~4 s importing): the same main()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not any(p.suffix == ".safetensors" for p in tmp_path.rglob("*"))


def test_usage_errors_exit_2_from_the_command(tmp_path):
    assert lmforge("no-such-verb", cwd=tmp_path).returncode == 2
    # argparse's own errors: one line too (it was a traceback, rc=1, once the run had loaded)
    result = lmforge("generate", "no-run", "--prompt", "x", "--temperature", "nan", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "lmforge generate: error: argument --temperature: 'nan' is not a finite number (see lmforge generate --help)"
    )
    result = lmforge("speedrun", "depth=0", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "lmforge speedrun: error: depth=0 must be in 1..48"


def test_readme_commands_at_tiny_scale(tmp_path, tiny_text):
    """pretrain -> generate -> export hf -> import hf -> finetune -> eval -> align, as the README shows them, on a
    tiny corpus."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(tiny_text[i * 5000 : (i + 1) * 5000])
    repo = Path(__file__).parent.parent
    result = lmforge(
        "pretrain", "--config", str(repo / "configs/pretrain/tiny.yaml"), f"data.path={corpus}",
        "train.steps=6", "model.max_seq_len=64", "train.eval_every=0", "train.batch_size=4", "model.vocab_size=384",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step      6/6" in result.stdout and (tmp_path / "runs/tiny/report.md").is_file()
    assert (tmp_path / "runs/tiny/loss_curve.png").stat().st_size > 1000
    first = lmforge(
        "generate", "tiny", "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0", cwd=tmp_path
    )
    second = lmforge(
        "generate", "tiny", "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0", cwd=tmp_path
    )
    assert first.returncode == 0 and first.stdout == second.stdout and len(first.stdout) > 1
    assert lmforge("export", "hf", "tiny", "hf-out", cwd=tmp_path).returncode == 0
    assert (tmp_path / "hf-out/config.json").is_file()
    assert lmforge("import", "hf", "hf-out", "--name", "back", cwd=tmp_path).returncode == 0
    again = lmforge(
        "generate", "back", "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0", cwd=tmp_path
    )
    assert again.stdout == first.stdout
    # fine-tune it with LoRA on Alpaca records, then evaluate the result
    tuned = lmforge(
        "finetune", "--config", str(repo / "configs/finetune/sft.yaml"), "base=tiny", "run.name=sft",
        f"data.path={repo / 'tests/fixtures/alpaca_20.json'}", "data.format=alpaca", "train.steps=3",
        "train.eval_every=0", "peft.method=lora", "peft.rank=4", "train.samples=1", "train.max_new_tokens=4",
        cwd=tmp_path,
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert (tmp_path / "runs/sft/adapter/adapter_config.json").is_file()
    assert "## finetune" in (tmp_path / "runs/sft/report.md").read_text().lower()
    scored = lmforge("eval", "sft", "--task", "perplexity", "--data", str(corpus / "19.txt"), cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert json.loads((tmp_path / "runs/sft/eval/perplexity.json").read_text())["metrics"]["ppl"] > 1
    # then align it with DPO (LoRA) on hh-rlhf pairs
    aligned = lmforge(
        "align", "--config", str(repo / "configs/align/dpo.yaml"), "policy=sft", "run.name=dpo",
        f"data.path={repo / 'tests/fixtures/preference_hh_rlhf_40.jsonl'}", "data.max_len=128", "train.steps=2",
        "train.eval_every=0", "peft.method=lora", "peft.rank=4", cwd=tmp_path,
    )  # fmt: skip
    assert aligned.returncode == 0, aligned.stderr
    assert json.loads((tmp_path / "runs/dpo/align.json").read_text())["training"]["steps"] == 2
    assert "## align" in (tmp_path / "runs/dpo/report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "RUN", "--prompt", "x", "--temperature", "nan"], "argument --temperature: 'nan' is not a finite"),
        (
            ["generate", "RUN", "--prompt", "x", "--temperature=-inf"],
            "argument --temperature: '-inf' is not a finite",
        ),
        (
            ["generate", "RUN", "--prompt", "x", "--temperature", "-0.5"],
            "--temperature -0.5 must be a finite number >=",
        ),
        (["generate", "RUN", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens -1 must be an integer >= 0"),
        (["generate", "RUN", "--prompt", "x", "--top-p", "1.5"], "--top-p 1.5 must be a finite number in (0, 1]"),
        (["generate", "RUN", "--prompt", "x", "--top-k", "2.5"], "argument --top-k: '2.5' is not a whole number"),
        (["generate", "RUN", "--prompt", "x", "--seed", "0x10"], "argument --seed: '0x10' is not a whole number"),
        (["generate", "RUN", "--prompt", "a\udcffb"], "argument --prompt: is not valid UTF-8 text"),
        (["chat", "RUN", "--top-p", "nan"], "argument --top-p: 'nan' is not a finite number"),
        (["chat", "RUN", "--max-new-tokens", "-5"], "--max-new-tokens -5 must be an integer >= 0"),
        (["import", "hf", "RUN", "--name", "../elsewhere"], "argument --name: '../elsewhere' is not a plain folder"),
        (["export", "hf"], "the following arguments are required: run, out"),
        (["plan", "--model", "llama-1b", "--gpus", "8", "--gpu-mem", "80GB", "--intra-gbps", "0"], "must be > 0"),
        (["plan", "--model", "llama-1b", "--gpus", "8", "--gpu-mem", "80GB", "--seq-len", "-3"], "must be >= 1"),
        (["plan", "--model", "llama-1b", "--gpus", "8", "--gpu-mem", "80GB", "--mfu", "nan"], "'nan' is not a finite"),
    ],
)
def test_nonsense_flags_exit_2_with_one_line(tiny_run, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_run) if a == "RUN" else a for a in args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(f"lmforge {args[0]}: error: ")
    assert list(tmp_path.iterdir()) == []
