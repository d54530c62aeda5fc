"""Knowledge distillation (Hinton et al., 2015; DistilBERT, Sanh et al., 2019): a student with fewer layers (started
from the teacher's layers evenly spaced, its embeddings, norm and head) or a narrower one (started at random) learns
from the base run on (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T) + hidden_weight * MSE(student's
layer outputs, projected when narrower, vs the teacher's layers they stand for). With distill.scratch the same
student is also trained from scratch on the next-token loss alone, for comparison.

    lmforge compress tiny method=distill distill.layers=1 calibration.path=text.txt train.steps=200 run.name=tiny-d
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.recover import held_out_loss, require_windows, split, train
from lmforge.errors import LmforgeError
from lmforge.models import Decoder, ModelConfig, build_model
from lmforge.run import Run
from lmforge.train.steps import pick_device


def student_config(teacher: ModelConfig, layers: int, dim: int, hidden_dim: int) -> ModelConfig:
    """The teacher's config with fewer layers and/or a narrower width (0 keeps the teacher's; the MLP width scales
    with dim unless given)."""
    layers, dim = layers or teacher.n_layers, dim or teacher.dim
    if layers > teacher.n_layers or dim > teacher.dim:
        raise LmforgeError(
            f"distill.layers={layers}, distill.dim={dim} exceed the teacher's {teacher.n_layers} layers of width "
            f"{teacher.dim}; a student must be smaller"
        )
    hidden_dim = hidden_dim or round(teacher.hidden_dim * dim / teacher.dim)
    cfg = replace(teacher, preset="", n_layers=layers, dim=dim, hidden_dim=hidden_dim)
    cfg.validate()
    return cfg


def mapped_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer starts from and imitates: the last of each even share of the teacher's
    layers (4 -> 2: layers 1 and 3)."""
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


@torch.no_grad()
def initialise_from(student: Decoder, teacher: Decoder, mapped: list[int]) -> None:
    """Copy the teacher's embeddings, positions, final norm, head and mapped layers into a student of its width."""
    for name in ("embed", "positions", "norm", "lm_head"):
        getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    for j, i in enumerate(mapped):
        student.layers[j].load_state_dict(teacher.layers[i].state_dict())


def layer_outputs(model: Decoder, idx: Tensor) -> tuple[list[Tensor], Tensor]:
    """idx (B, T) -> (every block's output (B, T, C), logits (B, T, V))."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = model.drop(model.positions.embed(model.embed(idx), pos))  # (B, T, C)
    outputs = []
    for block in model.layers:
        x = block(x, model.positions, pos)
        outputs.append(x)
    return outputs, model.lm_head(model.norm(x))


def distill_loss(student: Tensor, teacher: Tensor, targets: Tensor, temperature: float, alpha: float) -> Tensor:
    """(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)), the KL
    summed over the vocabulary and averaged over tokens; logits (B, T, V), targets (B, T)."""
    V = student.shape[-1]
    ce = F.cross_entropy(student.reshape(-1, V).float(), targets.reshape(-1))
    log_p = F.log_softmax(teacher.reshape(-1, V).float() / temperature, dim=-1)  # (B*T, V)
    log_q = F.log_softmax(student.reshape(-1, V).float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def compress(cfg: CompressConfig, teacher: Decoder, tokenizer, windows: Tensor | None, run: Run):
    """method=distill: train a smaller student from the base for train.steps steps (and one from scratch)."""

    dc, steps = cfg.distill, cfg.train.steps
    scfg = student_config(teacher.cfg, dc.layers, dc.dim, dc.hidden_dim)
    require_windows(windows, steps, "train.steps")
    mapped = mapped_layers(teacher.cfg.n_layers, scfg.n_layers)
    student = build_model(scfg, seed=cfg.run.seed)
    narrower = scfg.dim != teacher.cfg.dim
    if not narrower:
        initialise_from(student, teacher, mapped)
    # the projection of the student's width to the teacher's is trained with it and dropped at save
    projection = nn.Linear(scfg.dim, teacher.cfg.dim, bias=False) if narrower else nn.Identity()
    device = pick_device(cfg.train.device)
    teacher.to(device).eval().requires_grad_(False)
    projection.to(device)

    def loss(x: Tensor) -> Tensor:
        idx, targets = x[:, :-1], x[:, 1:]
        with torch.no_grad():
            teacher_hidden, teacher_logits = layer_outputs(teacher, idx)
        hidden, logits = layer_outputs(student, idx)
        total = distill_loss(logits, teacher_logits, targets, dc.temperature, dc.alpha)
        if dc.hidden_weight:
            pairs = [(projection(h), teacher_hidden[i]) for h, i in zip(hidden, mapped, strict=True)]
            total = total + dc.hidden_weight * sum(F.mse_loss(s, t) for s, t in pairs) / len(pairs)
        return total

    summary: dict[str, Any] = {
        "student_layers": scfg.n_layers,
        "student_dim": scfg.dim,
        "teacher_params": teacher.num_params(),
        "student_params": student.num_params(),
        "mapped_layers": mapped if not narrower else [],
    }
    if windows is not None:
        windows, held = split(windows)
        summary["held_out_teacher"] = held_out_loss(teacher, held)
        params = [*student.parameters(), *projection.parameters()]
        summary.update(train(student, windows, held, cfg.train, run, steps, loss, params, "distill", cfg.run.seed))
        if dc.scratch:
            scratch = build_model(scfg, seed=cfg.run.seed)
            summary.update(train(scratch, windows, held, cfg.train, run, steps, label="scratch", seed=cfg.run.seed))
    teacher.cpu()
    return Compressed(student, summary, steps)
