"""`lmforge compress report`: one row per run, sizes that are the weight files', perplexity equal to the eval
backend's rolling NLL computed directly, the files written, and one-line exit-2 errors for bad input."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.cli import main as cli
from lmforge.eval.backends import Local


@pytest.fixture(scope="module")
def runs(tiny_run, tiny_text, tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    cli(["compress", str(tiny_run), "method=int8", f"run.root={root}", "run.name=int8"])
    cli(["compress", str(tiny_run), "method=int4", "quant.group_size=32", f"run.root={root}", "run.name=int4"])
    text = root / "text.txt"
    text.write_text(tiny_text[:20_000])
    return tiny_run, root / "int8", root / "int4", text


def test_report_has_a_row_per_run_with_file_sizes_and_the_backends_perplexity(runs, tmp_path, capsys):
    base, int8, int4, text = runs
    out = int8  # the default: the first OUT, whose run report gets the comparison as a section
    args = ["--text", str(text), "--chars", "2000", "--limit", "6", "--tokens", "4"]
    cli(["compress", "report", str(base), str(int8), str(int4), *args])
    printed = capsys.readouterr().out
    report = json.loads((out / "compress_report.json").read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["base", "int8", "int4"]
    assert (out / "compress_report.md").read_text().count("\n| ") == 4  # header and three rows
    assert sum(line.startswith("| ") for line in printed.splitlines()) == 4
    assert "## compress_report" in (int8 / "report.md").read_text()
    body = text.read_text()[:2000]
    for row, run in zip(rows, (base, int8, int4), strict=True):
        assert row["size_bytes"] == (latest_checkpoint(run) / "model.safetensors").stat().st_size
        model, tokenizer = load_run(run)
        nll, n = Local(model, tokenizer).rolling_nll(body)
        assert row["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-9)
        assert row["peak_rss_bytes"] > 2**20 and row["decode_tok_s"] > 0 and row["decode_tok_s_32"] > 0
        assert 0 <= row["score"] <= 1 and row["task"] == "next_line acc"
    assert rows[0]["size_bytes_ratio"] == 1 and rows[2]["size_bytes"] < rows[1]["size_bytes"] < rows[0]["size_bytes"]
    assert rows[1]["ppl_ratio"] == pytest.approx(rows[1]["ppl"] / rows[0]["ppl"])


@pytest.mark.parametrize("case", ["no run", "not compressed", "no text file", "no --text"])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, case):
    base, int8, _, text = runs
    args = {
        "no run": [str(base), str(tmp_path / "nowhere"), "--text", str(text)],
        "not compressed": [str(base), str(base), "--text", str(text)],
        "no text file": [str(base), str(int8), "--text", str(tmp_path / "missing.txt")],
        "no --text": [str(base), str(int8)],
    }[case]
    with pytest.raises(SystemExit) as exit:
        cli(["compress", "report", *args, "--out", str(tmp_path / "out")])
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not (tmp_path / "out" / "compress_report.json").exists()
