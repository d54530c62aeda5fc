"""Low-rank factorisation: each block linear W (out, in) becomes B A by truncated SVD, its rank the smallest keeping
lowrank.energy of its squared singular values, or chosen across all matrices to fit lowrank.budget of their
parameters (greedily by energy gained per parameter); a matrix whose rank saves nothing stays dense. An optional
recovery fine-tune follows.

    lmforge compress tiny method=lowrank lowrank.energy=0.9 lowrank.recover_steps=100 calibration.path=text.txt
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmforge.compress.compressed import Compressed
from lmforge.compress.config import CompressConfig
from lmforge.compress.modules import BUILDERS, linear_names
from lmforge.compress.recover import held_out_loss, require_windows, split, train
from lmforge.models import Decoder
from lmforge.run import Run


class LowRankLinear(nn.Module):
    """x -> B (A x) + bias, A (rank, in) and B (out, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Parameter(torch.zeros(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_svd(cls, u: Tensor, s: Tensor, vh: Tensor, rank: int, bias: Tensor | None = None) -> LowRankLinear:
        """The rank-`rank` truncation of W = U diag(s) Vh, sqrt(s) given to each factor so both have one scale."""
        layer = cls(vh.shape[1], u.shape[0], rank, bias is not None).to(u.device)
        root = s[:rank].sqrt()
        with torch.no_grad():
            layer.b.copy_(u[:, :rank] * root)
            layer.a.copy_(root[:, None] * vh[:rank])
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def spec(self) -> dict[str, Any]:
        return {"kind": "lowrank", "rank": self.rank}

    @property
    def weight(self) -> Tensor:
        return self.b @ self.a

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.a), self.b, self.bias)


BUILDERS["lowrank"] = lambda old, spec: LowRankLinear(
    old.in_features, old.out_features, spec["rank"], old.bias is not None
)


def rank_by_energy(s: Tensor, energy: float) -> int:
    """The smallest rank r with sum(s[:r]^2) >= energy * sum(s^2)."""
    share = (s.double() ** 2).cumsum(0)
    share = share / share[-1]
    return min(len(s), int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype) - 1e-12)) + 1)


def ranks_by_budget(spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], budget: float) -> dict[str, int]:
    """Ranks fitting budget * (the matrices' parameters), taking rank-one slices in order of the share of their
    matrix's energy gained per parameter (each matrix keeps at least rank 1)."""
    total = sum(o * i for o, i in shapes.values())
    items = []
    for name, s in spectra.items():
        energy = s.double() ** 2
        gain = energy / energy.sum() / sum(shapes[name])  # per parameter of one rank-one slice (out + in)
        items += [(g, name) for g in gain[1:].tolist()]
    ranks = dict.fromkeys(spectra, 1)
    spent = sum(sum(shapes[n]) for n in spectra)
    for _, name in sorted(items, key=lambda item: -item[0]):
        cost = sum(shapes[name])
        if spent + cost > budget * total:
            break
        ranks[name] += 1
        spent += cost
    return ranks


def compress(cfg: CompressConfig, model: Decoder, tokenizer, windows: Tensor | None, run: Run):
    """method=lowrank: factorise the block linears, then recover for lowrank.recover_steps steps."""

    lc = cfg.lowrank
    require_windows(windows, lc.recover_steps, "lowrank.recover_steps")
    names = linear_names(model)
    svds = {n: torch.linalg.svd(model.get_submodule(n).weight.detach().float(), full_matrices=False) for n in names}
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    if lc.budget > 0:
        ranks = ranks_by_budget({n: svd.S for n, svd in svds.items()}, shapes, lc.budget)
    else:
        ranks = {n: rank_by_energy(svd.S, lc.energy) for n, svd in svds.items()}
    summary: dict[str, Any] = {}
    if windows is not None:
        windows, held = split(windows)
        summary["held_out_dense"] = held_out_loss(model, held)
    factored, before, after = {}, 0, 0
    for name in names:
        (out, inp), rank = shapes[name], ranks[name]
        before += out * inp
        if rank * (out + inp) >= out * inp:
            after += out * inp
            continue  # the factors would be no smaller than the matrix
        linear = model.get_submodule(name)
        u, s, vh = svds[name]
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, LowRankLinear.from_svd(u, s, vh, rank, linear.bias))
        factored[name] = rank
        after += rank * (out + inp)
    summary.update({"factored": factored, "linear_params_before": before, "linear_params_after": after})
    summary["linear_params_share"] = after / before
    if windows is not None:
        summary.update(train(model, windows, held, cfg.train, run, lc.recover_steps, seed=cfg.run.seed))
    return Compressed(model, summary, lc.recover_steps)
