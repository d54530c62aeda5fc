"""Compression's settings (`lmforge compress BASE method=NAME ... run.name=OUT`): the base run, the method and its
options, the calibration text and, for the methods that train, the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.checkpoint import latest_checkpoint, read_model_config
from lmforge.compress.rtn import OBSERVERS
from lmforge.config import check
from lmforge.errors import LmforgeError
from lmforge.finetune.config import SftTrainConfig
from lmforge.models import ModelConfig
from lmforge.run import RunConfig, resolve_run

QUANT_METHODS = ("int8", "int4", "gptq", "awq", "nf4", "ternary")
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "structured")
OTHER_METHODS = ("distill", "lowrank", "share")
NEEDS_CALIBRATION = ("gptq", "awq", "wanda", "sparsegpt")


@dataclass
class CalibrationConfig:
    path: str = ""
    """A text file whose tokens calibrate GPTQ, AWQ, Wanda and SparseGPT (and train distill, lowrank and share)."""
    samples: int = 128
    """Windows of seq_len tokens drawn from it (fewer when the text is shorter)."""
    seq_len: int = 512
    """Tokens per window (capped at the model's context)."""

    def validate(self) -> None:
        check(self.samples > 0, f"calibration.samples={self.samples} must be positive")
        check(self.seq_len > 1, f"calibration.seq_len={self.seq_len} must be > 1")
        check(not self.path or Path(self.path).is_file(), f"calibration.path={self.path!r} is not a file")


@dataclass
class QuantConfig:
    bits: int = 4
    """Bits per weight for int4, gptq and awq (4 or 8; int8 is always 8)."""
    group_size: int = -1
    """Input columns sharing a scale (32, 64, 128...; 0: one scale per output channel; -1: the method's default,
    per channel for int8 and 128 for the 4-bit methods)."""
    symmetric: bool = True
    """Symmetric: codes centred on zero, one scale per group; asymmetric: a scale and a zero point per group."""
    act_order: bool = False
    """GPTQ: quantize columns in order of decreasing Hessian diagonal (groups keep their place)."""
    damp: float = 0.01
    """GPTQ/SparseGPT: add damp * mean(diag(H)) to the Hessian's diagonal."""
    block_size: int = 128
    """GPTQ/SparseGPT: columns updated together (lazy batch updates)."""
    head: bool = False
    """Quantize the LM head too (the embedding table stays float: it is read by rows)."""
    observer: str = ""
    """How a group's range is chosen: minmax (covers every weight) or mse (shrunk to the least rounding error, clipping
    outliers; llm-compressor's MSE observer); empty: the method's default, mse for gptq and minmax for the others."""

    def groups(self, bits: int) -> int:
        """The group size in use for `bits`-bit weights (0: per channel)."""
        return self.group_size if self.group_size >= 0 else (0 if bits == 8 else 128)

    def observer_for(self, method: str) -> str:
        """The observer in use for `method`."""
        return self.observer or ("mse" if method == "gptq" else "minmax")

    def validate(self) -> None:
        check(self.bits in (4, 8), f"quant.bits={self.bits} must be 4 or 8")
        check(self.group_size >= -1, f"quant.group_size={self.group_size} must be >= 0 (0: per channel)")
        check(self.damp >= 0, f"quant.damp={self.damp} must be >= 0")
        check(self.block_size > 0, f"quant.block_size={self.block_size} must be positive")
        check(
            self.observer in ("", *OBSERVERS),
            f"quant.observer={self.observer!r} is not an observer; choose minmax or mse (or leave it empty)",
        )


@dataclass
class PruneConfig:
    sparsity: float = 0.5
    """Share of each linear layer's weights set to zero (unstructured)."""
    pattern: str = ""
    """N:M semi-structured sparsity: N weights kept in every M consecutive inputs of a row (2:4 keeps two of four);
    empty: unstructured."""
    heads: int = 0
    """structured: attention heads removed per layer (whole kv groups where heads share keys)."""
    neurons: int = 0
    """structured: MLP neurons removed per layer."""
    layers: int = 0
    """structured: whole layers removed."""

    def validate(self) -> None:
        check(0.0 <= self.sparsity < 1.0, f"prune.sparsity={self.sparsity} must be in [0, 1)")
        if self.pattern.isdigit() and int(self.pattern) >= 60:  # YAML 1.1 reads an unquoted 2:4 as base 60: 124
            self.pattern = f"{int(self.pattern) // 60}:{int(self.pattern) % 60}"
        if self.pattern:
            n, _, m = self.pattern.partition(":")
            check(n.isdigit() and m.isdigit() and 0 < int(n) < int(m), f"prune.pattern={self.pattern!r} is not N:M")
        for name in ("heads", "neurons", "layers"):
            check(getattr(self, name) >= 0, f"prune.{name}={getattr(self, name)} must be >= 0")

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of the N:M pattern, or None for unstructured sparsity."""
        n, _, m = self.pattern.partition(":")
        return (int(n), int(m)) if self.pattern else None

    def check_model(self, model: ModelConfig, method: str) -> None:
        """Refuse, before any run folder exists, a prune the base's shapes cannot take."""
        if method == "structured":
            check(self.heads or self.neurons or self.layers, "structured pruning needs prune.heads, neurons or layers")
            group = model.n_heads // model.n_kv_heads
            check(
                self.heads % group == 0,
                f"prune.heads={self.heads} must be a multiple of {group}: heads sharing a kv head go together",
            )
            for name, limit in (("heads", model.n_heads), ("neurons", model.hidden_dim), ("layers", model.n_layers)):
                check(
                    getattr(self, name) < limit,
                    f"prune.{name}={getattr(self, name)} would remove every one of the {limit} {name}; give fewer",
                )
            check(not self.heads or model.pos != "alibi", "prune.heads cannot remove ALiBi heads (slopes by index)")
        elif self.pattern and method in ("magnitude", "wanda", "sparsegpt"):
            m = self.nm()[1]
            for width in (model.dim, model.n_heads * model.head_dim, model.hidden_dim):
                check(width % m == 0, f"prune.pattern={self.pattern}: {m} does not divide a layer's {width} inputs")


@dataclass
class DistillConfig:
    layers: int = 0
    """Student layers (0: the teacher's), taken from the teacher's layers evenly spaced."""
    dim: int = 0
    """Student width (0: the teacher's); a narrower student starts from scratch."""
    hidden_dim: int = 0
    """Student MLP width (0: scaled with dim)."""
    temperature: float = 2.0
    """Softmax temperature of the logit KL."""
    alpha: float = 0.5
    """Weight of the KL term against the next-token loss."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE (with a learned projection when widths differ)."""
    scratch: bool = True
    """Also train the same student from scratch for the same steps, for the report."""

    def validate(self) -> None:
        check(self.temperature > 0, f"distill.temperature={self.temperature} must be > 0")
        check(0 <= self.alpha <= 1, f"distill.alpha={self.alpha} must be in [0, 1]")
        check(self.hidden_weight >= 0, f"distill.hidden_weight={self.hidden_weight} must be >= 0")


@dataclass
class LowRankConfig:
    energy: float = 0.9
    """Keep each matrix's smallest rank holding this share of its squared singular values."""
    budget: float = 0.0
    """Instead: a target share of the linear weights' size kept (0 < budget < 1); ranks chosen by energy globally."""
    recover_steps: int = 0
    """Recovery fine-tune steps on the calibration text after the factorisation (0: none)."""

    def validate(self) -> None:
        check(0 < self.energy <= 1, f"lowrank.energy={self.energy} must be in (0, 1]")
        check(0 <= self.budget < 1, f"lowrank.budget={self.budget} must be in [0, 1)")
        check(self.recover_steps >= 0, f"lowrank.recover_steps={self.recover_steps} must be >= 0")


@dataclass
class ShareConfig:
    groups: int = 0
    """Distinct layers kept (0: half the base's); each run of consecutive layers shares one block (see share.init)."""
    recover_steps: int = 50
    """Recovery fine-tune steps on the calibration text."""
    init: str = "first"
    """A shared block starts from its first layer's weights (first) or their mean (mean); on the speedrun's 4 layers in
    2 groups, held-out loss 3.43 (first) vs 4.72 (mean) before recovery, 3.15 vs 3.92 after 60 steps."""

    def validate(self) -> None:
        check(self.groups >= 0, f"share.groups={self.groups} must be >= 0")
        check(self.init in ("mean", "first"), f"share.init={self.init!r} must be mean or first")
        check(self.recover_steps >= 0, f"share.recover_steps={self.recover_steps} must be >= 0")


@dataclass
class CompressConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="compressed"))
    base: str = ""
    """The run to compress: its folder, or its name under run.root."""
    method: str = "int8"
    """int8, int4, gptq, awq, nf4, ternary; magnitude, wanda, sparsegpt, structured; distill, lowrank, share."""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    share: ShareConfig = field(default_factory=ShareConfig)
    train: SftTrainConfig = field(default_factory=lambda: SftTrainConfig(steps=100, lr=1e-4, samples=0))
    """The loop of the methods that train (ternary's QAT, distill, lowrank's and share's recovery)."""

    def validate(self) -> None:
        methods = (*QUANT_METHODS, *PRUNE_METHODS, *OTHER_METHODS)
        check(self.method in methods, f"method={self.method!r} is not a method; choose one of {', '.join(methods)}")
        check(bool(self.base), "base is empty; name the run to compress (lmforge compress BASE method=...)")
        base = resolve_run(self.base, self.run.root)
        if latest_checkpoint(base) is None:
            raise LmforgeError(f"base run {base} has no checkpoint; train it first (lmforge pretrain)")
        if base.resolve() == (Path(self.run.root) / self.run.name).resolve():
            raise LmforgeError(f"run.name={self.run.name} is the base run itself; give the compressed run a new name")
        self.quant.observer = self.quant.observer_for(self.method)  # recorded in the run as the one in use
        if self.method in PRUNE_METHODS:
            self.prune.check_model(read_model_config(latest_checkpoint(base)), self.method)
        if self.method in NEEDS_CALIBRATION and not self.calibration.path:
            raise LmforgeError(
                f"method={self.method} needs calibration text; give calibration.path=FILE (a plain text file)"
            )
