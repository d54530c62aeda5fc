"""QLoRA's peak memory against full fine-tuning (and LoRA) of SmolLM2-135M-Instruct: `lmforge finetune` in a fresh
process per method on the same Alpaca conversations, batch, sequence length and precision (fp32 weights), reading
each run's finetune.json. The issue's target is QLoRA <= 0.4x full fine-tuning's peak.

    .venv/bin/python benchmarks/bench_qlora_memory.py            # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_qlora_memory.py --steps 3 --batch 4 --seq 256 --ac

Two peaks per method: the process's whole peak (loading the float checkpoint, then QLoRA quantising it, counts
here) and training's own (the resident high-water mark reset after loading, over the training steps; on a GPU the
allocator's peak). The ratio is given for both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from benchmarks.machine import require_data  # noqa: E402

ALPACA = ROOT.parent / "shared/data/instruct/alpaca_subset.json"
SMOLLM2 = Path.home() / ".cache/lmforge/models/SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("full", "lora", "qlora")


def finetune(root: Path, base: Path, data: Path, method: str, args) -> dict:
    """One `lmforge finetune` process; its finetune.json's training summary."""
    overrides = [
        f"base={base}",
        f"data.path={data}",
        "data.format=alpaca",
        f"data.seq_len={args.seq}",
        "data.val_fraction=0.05",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.dtype={args.dtype}",
        f"train.device={args.device}",
        "train.samples=0",
        "train.log_every=1",
        f"peft.method={method}",
        f"train.activation_checkpointing={str(args.ac).lower()}",
        f"run.root={root}",
        f"run.name={method}",
    ]
    subprocess.run([sys.executable, "-m", "lmforge", "finetune", *overrides], check=True, cwd=ROOT)
    return json.loads((root / method / "finetune.json").read_text())["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ALPACA)
    parser.add_argument("--records", type=int, default=200, help="the first N Alpaca records")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing for every method")
    args = parser.parse_args()
    data = require_data(args.data)
    if not SMOLLM2.is_file():
        print(f"{SMOLLM2} is missing; run `make models` first", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subset = root / "alpaca.json"
        subset.write_text(json.dumps(json.loads(data.read_text())[: args.records]))
        base = root / "smollm2"
        importing = ["import", "gguf", str(SMOLLM2), "--name", base.name, "--root", str(root)]
        subprocess.run([sys.executable, "-m", "lmforge", *importing], check=True, cwd=ROOT)
        rows = {m: finetune(root, base, subset, m, args) for m in METHODS}
    mib = 2**20
    print(f"\nSmolLM2-135M-Instruct, {args.records} Alpaca records, batch {args.batch} x seq {args.seq}, {args.steps}")
    print(f"steps, {args.dtype} ({args.device}), activation checkpointing {'on' if args.ac else 'off'}")
    print("| method | trainable | process peak MiB | training peak MiB | step s | held-out loss after |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(
            f"| {m} | {r['trainable_params']:,} | {r['peak_memory_bytes'] / mib:,.0f} | "
            f"{r['train_peak_memory_bytes'] / mib:,.0f} | {r['step_seconds']:.2f} | {r['val_loss_after']:.3f} |"
        )
    full, q = rows["full"], rows["qlora"]
    print(f"qlora / full, process peak: {q['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}x (target <= 0.4x)")
    print(f"qlora / full, training peak: {q['train_peak_memory_bytes'] / full['train_peak_memory_bytes']:.2f}x")


if __name__ == "__main__":
    main()
