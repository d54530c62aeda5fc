"""compare_methods: one row per method with the counts a report table needs, from real (tiny) training."""

from __future__ import annotations

import torch

from lmforge.finetune.compare import compare_methods
from lmforge.finetune.methods import PeftConfig


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
