"""Alignment's entry: the method's own loop (rm.py, preference.py for DPO and its relatives, ppo.py, grpo.py), each
writing checkpoints, metrics and `align.json` into the run folder.

Run: `lmforge align --config configs/align/dpo.yaml policy=RUN data.path=FILE run.name=NAME [--resume]`.
"""

from __future__ import annotations

from lmforge.align import grpo, ppo, preference, rm
from lmforge.align.config import AlignConfig
from lmforge.run import Run

METHODS = {"rm": rm.train, "dpo": preference.train, "ppo": ppo.train, "grpo": grpo.train}


def main(cfg: AlignConfig, run: Run) -> dict[str, float]:
    return METHODS[cfg.method](cfg, run)
