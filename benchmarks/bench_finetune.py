"""Fine-tuning speed: useful (non-padding) tokens/s of `lmforge finetune` against TRL's SFTTrainer (with peft for
LoRA) on the transformers export of the same model, the same Alpaca conversations, sequence length, batch, steps and
precision (fp32), for full SFT and LoRA r=16. TRL runs with its defaults (one padded example per row) and with the
packings that are its fastest here (best-fit and wrapped, no gradient checkpointing). Prints each figure and the
ratios; the issue's targets are >= 1.5x TRL's defaults and >= 1.0x its fastest.

    .venv/bin/python benchmarks/bench_finetune.py                 # depth 4, dim 256, vocab 8192: ~5 min
    .venv/bin/python benchmarks/bench_finetune.py --steps 30 --batch 8 --seq 512

The gains are in what is computed, not in faster kernels (pre-training already matches transformers' step time):
no padding, no attention across packed examples, no gradients for frozen weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from benchmarks.machine import require_data, set_threads  # noqa: E402
from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.finetune import sft  # noqa: E402
from lmforge.finetune.config import FinetuneConfig, SftDataConfig, SftTrainConfig  # noqa: E402
from lmforge.finetune.methods import PeftConfig  # noqa: E402
from lmforge.interop.hf import export_hf  # noqa: E402
from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.run import Run, RunConfig  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

ALPACA = Path("../shared/data/instruct/alpaca_subset.json")
LORA = dict(rank=16, alpha=32.0, targets=["q", "k", "v", "proj"])
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def user_turn(record: dict) -> str:
    return record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")


def make_base(root: Path, records: list[dict], seq: int) -> Path:
    """A speedrun-size LLaMA (4 layers, dim 256) with a BPE trained on the data, as a run and a transformers export."""
    texts = [user_turn(r) + "\n" + r["output"] for r in records]
    tokenizer = Tokenizer.train(texts, 8192)
    cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=704, max_seq_len=seq)
    run = root / "base"
    tokenizer.save(run)
    save_checkpoint(run, 0, build_model(cfg, seed=0), state={})
    return run


def ours(base: Path, data: Path, root: Path, method: str, steps: int, batch: int, seq: int) -> float:
    peft = PeftConfig(method=method, **(LORA if method == "lora" else {}))
    cfg = FinetuneConfig(
        run=RunConfig(name=f"ours-{method}", root=str(root)),
        base=str(base),
        data=SftDataConfig(path=str(data), format="alpaca", val_fraction=0.02, packing=True, seq_len=seq),
        train=SftTrainConfig(steps=steps, batch_size=batch, lr=1e-4, dtype="fp32", samples=0, log_every=steps),
        peft=peft,
    )
    return sft.main(cfg, Run.from_config(cfg.run))["tokens_per_s"]


# TRL's settings: its defaults, and the two packings that are its fastest on a CPU (padding-free attention needs
# FlashAttention; with SDPA, TRL's best-fit packing still pads nothing but keeps examples apart by position ids)
TRL_SETTINGS = {
    "default": {},
    "packed (bfd)": dict(packing=True, gradient_checkpointing=False),
    "packed (wrapped)": dict(packing=True, packing_strategy="wrapped", gradient_checkpointing=False),
}


def trl(export: Path, records: list[dict], root: Path, method: str, steps: int, batch: int, seq: int, setting: str):
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    conversations = [
        {
            "prompt": [{"role": "user", "content": user_turn(r)}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }
        for r in records
    ]
    args = SFTConfig(
        output_dir=str(root / f"trl-{method}-{len(setting)}"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        max_length=seq,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=steps,
        dataloader_num_workers=0,
        seed=0,
        **TRL_SETTINGS[setting],
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    lora = (
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=HF_LORA_TARGETS) if method == "lora" else None
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(conversations),
        processing_class=tokenizer,
        peft_config=lora,
    )
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]  # real tokens per row, packed or not
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return sum(lengths) / len(lengths) * batch * steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--records", type=int, default=1000, help="Alpaca records used (the first N)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    require_data(ALPACA)
    threads = set_threads(args.threads or None)
    records = json.loads(ALPACA.read_text())[: args.records]
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        root = Path(tmp)
        data = root / "alpaca.json"
        data.write_text(json.dumps(records))
        base = make_base(root, records, args.seq)
        export = export_hf(base, root / "export")
        rows = []
        for method in ("full", "lora"):
            ours_tps = ours(base, data, root, method, args.steps, args.batch, args.seq)
            theirs = {s: trl(export, records, root, method, args.steps, args.batch, args.seq, s) for s in TRL_SETTINGS}
            rows.append((method, ours_tps, theirs))
    print(f"\nuseful tokens/s, {args.steps} steps of {args.batch} x {args.seq}, fp32, {threads} threads")
    print(
        f"{'method':<8}{'lmforge':>10}"
        + "".join(f"{'TRL ' + s:>22}" for s in TRL_SETTINGS)
        + "  vs default  vs fastest"
    )
    for method, ours_tps, theirs in rows:
        fastest = max(theirs.values())
        cells = "".join(f"{theirs[s]:>22,.0f}" for s in TRL_SETTINGS)
        print(f"{method:<8}{ours_tps:>10,.0f}{cells}{ours_tps / theirs['default']:>11.2f}x{ours_tps / fastest:>11.2f}x")


if __name__ == "__main__":
    main()
