"""compare_methods: one row per method with the counts a report table needs, from real (tiny) training; on a run, a
table in its report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.finetune.compare import compare_methods, on_run
from lmforge.finetune.methods import PeftConfig
from lmforge.report import write_report


def test_rows_count_and_train(make_base):
    state = make_base().state_dict()

    def factory():
        model = make_base()
        model.load_state_dict(state)
        return model

    g = torch.Generator().manual_seed(0)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, 256, (3, 4, 17), generator=g)]
    methods = {"full": (PeftConfig(method="full"), 1e-2), "lora": (PeftConfig(method="lora", targets=["q"]), 1e-2)}
    rows = compare_methods(factory, batches * 2, steps=4, heldout=batches[:1], methods=methods)
    full, lora = rows
    assert full["trainable"] == factory().num_params() and full["share"] == 1.0
    assert lora["trainable"] == 2 * (8 * 64 + 64 * 8)  # 2 layers x (A: r x dim, B: q rows x r)
    assert full["memory_mb"] > lora["memory_mb"] > 0 and lora["step_ms"] > 0
    assert all(r["heldout_loss"] < r["heldout_before"] for r in rows)  # the held-out batch is one trained on here


def test_a_run_gets_a_methods_table_in_its_report(tmp_path, tiny_run):
    run = tmp_path / "base"
    shutil.copytree(tiny_run, run)
    data = str(Path(__file__).parent.parent / "fixtures/alpaca_20.json")
    on_run(str(run), data, steps=2, batch=4, seq_len=96, methods=["full", "lora"])
    table = json.loads((run / "peft_methods.json").read_text())["methods"]
    assert [r["method"] for r in table] == ["full", "lora r8 qkv,proj", "lora r8 all", "rslora", "dora",
                                            "lora+ (ratio 16)"]  # fmt: skip
    assert table[0]["trainable_percent"] == 100.0 and 0 < table[1]["trainable_params"] < table[2]["trainable_params"]
    report = write_report(run).read_text()
    assert "## peft_methods" in report
    assert (
        "| method | lr | trainable params | trainable percent | memory MiB | fastest step ms | held out loss after |"
        in report
    )
    with pytest.raises(LmforgeError, match="--methods lorax unknown; choose from adapter, freeze, full"):
        on_run(str(run), data, methods=["lorax"])
