"""Structured pruning: the shrunk model computes what the base computes with the removed heads, neurons and layers
zeroed out, exports to transformers with logit parity and imports back, and refuses to remove everything."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from lmforge import cli
from lmforge.checkpoint import load_model, load_run
from lmforge.interop.hf import export_hf, import_hf


@pytest.fixture(scope="module")
def calib(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(tiny_text[:20_000])
    return path


def compress(tiny_run, root, name, *options):
    cli.main(["compress", str(tiny_run), "method=structured", *options, f"run.root={root}", f"run.name={name}"])
    return root / name


def zeroed(base, removed):
    """The base with the removed layers dropped and the removed heads' and neurons' outputs zeroed."""
    model = copy.deepcopy(base)
    cfg = model.cfg
    G, D = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    with torch.no_grad():
        for i, groups in removed["kv_heads"].items():
            proj = model.layers[int(i)].attn.proj.weight  # (C, H * D): columns of query heads g * G ... g * G + G - 1
            for g in groups:
                proj[:, g * G * D : (g + 1) * G * D] = 0
            model.layers[int(i)].mlp.down.weight[:, removed["neurons"][i]] = 0
    for i in sorted(removed["layers"], reverse=True):
        del model.layers[i]
    return model


@pytest.mark.parametrize("calibrated", [True, False])
def test_pruned_model_is_the_base_with_parts_zeroed(tiny_run, calib, tmp_path, calibrated):
    options = [f"calibration.path={calib}", "calibration.samples=8", "calibration.seq_len=64"] if calibrated else []
    run = compress(tiny_run, tmp_path, "narrow", "prune.heads=2", "prune.neurons=48", "prune.layers=1", *options)
    pruned, base = load_run(run)[0], load_run(tiny_run)[0]
    assert (pruned.cfg.n_layers, pruned.cfg.n_heads, pruned.cfg.n_kv_heads, pruned.cfg.hidden_dim) == (1, 2, 1, 80)
    assert pruned.cfg.head_dim == base.cfg.head_dim and pruned.num_params() == pruned.cfg.num_params()
    removed = json.loads((run / "structured_removed.json").read_text())
    summary = json.loads((run / "compress.json").read_text())
    assert summary["params"] < summary["base_params"] and summary["importance"] == (
        "calibration" if calibrated else "weights"
    )
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), zeroed(base, removed)(ids), atol=1e-5, rtol=1e-5)


def test_heads_only_pruned_model_exports_to_transformers_and_back(tiny_run, tmp_path):
    run = compress(tiny_run, tmp_path, "fewer-heads", "prune.heads=2", "prune.neurons=16")
    pruned = load_run(run)[0]
    assert pruned.cfg.n_heads * pruned.cfg.head_dim != pruned.cfg.dim  # 2 heads of 16 in a width of 64
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    back = load_model(import_hf(out, tmp_path / "back")).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - pruned(ids)).abs().max().item() <= 1e-4
        assert torch.equal(back(ids), pruned(ids))


@pytest.mark.parametrize(
    "option,message",
    [
        ("prune.heads=4", "every one of the 4 heads"),
        ("prune.heads=1", "multiple of 2"),
        ("prune.neurons=128", "every one of the 128 neurons"),
        ("prune.layers=2", "every one of the 2 layers"),
    ],
)
def test_removing_everything_exits_2_and_writes_nothing(tiny_run, tmp_path, capsys, option, message):
    with pytest.raises(SystemExit) as exit_:
        compress(tiny_run, tmp_path, "gone", option)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "gone").exists()


def test_heads_narrower_than_the_width_decode_on_the_cpu(tiny_run, tmp_path):
    from lmforge.cpu.runner import numpy_step
    from lmforge.models.kv_cache import KVCache

    pruned = load_run(compress(tiny_run, tmp_path, "cpu", "prune.heads=2"))[0]
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = pruned(ids)[0]  # (T, V)
        cache = KVCache(pruned.cfg, 1, 16)
        pruned(ids[:, :6], cache=cache)
        step = numpy_step(pruned, cache)
        for t in range(6, 12):
            torch.testing.assert_close(torch.from_numpy(step(int(ids[0, t]))), full[t], atol=1e-5, rtol=1e-5)
