"""Distillation: the loss is the formula's (checked against torch's kl_div), a shallower student starts from the
teacher's layers and loads back as a plain smaller decoder, a narrower one trains through a projection that is not
saved, and a student larger than its teacher is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_run
from lmforge.cli import main
from lmforge.compress.distill import distill_loss, mapped_layers


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.0), (2.0, 0.5), (4.0, 1.0)])
def test_distill_loss_is_the_formula(temperature, alpha):
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    ce = F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1))
    kl = F.kl_div(
        F.log_softmax(student / temperature, -1).reshape(-1, 11),
        F.log_softmax(teacher / temperature, -1).reshape(-1, 11),
        reduction="batchmean",
        log_target=True,
    )
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    assert torch.allclose(distill_loss(student, teacher, targets, temperature, alpha), expected, atol=1e-6)


def test_student_layers_are_evenly_spaced():
    assert mapped_layers(4, 2) == [1, 3] and mapped_layers(30, 3) == [9, 19, 29] and mapped_layers(2, 2) == [0, 1]


def test_shallower_student_loads_back_as_a_plain_decoder(tmp_path, tiny_run, tiny_text, compress_tiny):
    base, _ = load_run(tiny_run)
    overrides = ["method=distill", "distill.layers=1", "distill.hidden_weight=1.0", "train.steps=3", "train.lr=1e-3"]
    result, path = compress_tiny(tmp_path, tiny_run, tiny_text, *overrides)
    summary = result.summary
    assert summary["mapped_layers"] == [1] and summary["scratch_held_out_after"] > 0
    assert summary["distill_held_out_after"] < summary["distill_held_out_before"]
    model, _ = load_run(path)
    assert model.cfg.n_layers == 1 and model.compression["method"] == "distill"
    assert model.num_params() < base.num_params()
    idx = torch.randint(0, 512, (2, 16))
    assert torch.equal(model(idx), result.model(idx))


def test_narrower_student_trains_through_a_projection_that_is_not_saved(tmp_path, tiny_run, tiny_text, compress_tiny):
    overrides = ["method=distill", "distill.dim=32", "distill.hidden_weight=1.0", "distill.scratch=false"]
    result, path = compress_tiny(tmp_path, tiny_run, tiny_text, *overrides, "train.steps=2")
    model, _ = load_run(path)
    assert model.cfg.dim == 32 and model.cfg.hidden_dim == 64
    assert set(model.state_dict()) == set(result.model.state_dict())


def test_student_deeper_than_teacher_exits_2_before_writing(tmp_path, tiny_run, tiny_text, capsys):
    text = tmp_path / "text.txt"
    text.write_text(tiny_text[:5000])
    args = ["method=distill", "distill.layers=3", f"calibration.path={text}", f"run.root={tmp_path}"]
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(tiny_run), *args])
    assert exit_.value.code == 2 and "distill.layers=3" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("metrics.jsonl"))


def test_distillation_without_calibration_text_exits_2_before_writing(tmp_path, tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", str(tiny_run), "method=distill", "distill.layers=1", f"run.root={tmp_path}"])
    assert exit_.value.code == 2 and "calibration.path" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("metrics.jsonl"))
