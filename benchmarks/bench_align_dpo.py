"""DPO speed: preference pairs/s of `lmforge align method=dpo` against TRL's DPOTrainer (with peft for LoRA) on the
transformers export of the same model, the same hh-rlhf pairs (prompt and each reply at most 128 tokens), batch, steps
and precision (fp32). Both sides are timed from the reference's log-probs to the last step: ours computes them once
before training; TRL's defaults run the reference (its copy, or the policy with the adapter off) every step with
gradient checkpointing on, and its fastest settings precompute them (padding-free DPO is unavailable in TRL 1.16).
Prints each figure and the ratios; the issue's targets are >= 1.5x TRL's defaults and >= 1.0x its fastest.

    .venv/bin/python benchmarks/bench_align_dpo.py                 # depth 4, dim 256, vocab 8192: ~5 min
    .venv/bin/python benchmarks/bench_align_dpo.py --steps 16 --batch 8
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
from lmforge.align import preference  # noqa: E402
from lmforge.align.config import AlignConfig, AlignDataConfig, DpoConfig  # noqa: E402
from lmforge.align.pairs import read_pairs  # noqa: E402
from lmforge.align.sequences import encode_reply  # noqa: E402
from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.finetune.config import SftTrainConfig  # noqa: E402
from lmforge.finetune.methods import PeftConfig  # noqa: E402
from lmforge.interop.hf import export_hf  # noqa: E402
from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.run import Run, RunConfig  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

HH = Path("../shared/data/preference/hh_rlhf_harmless_base_test_dev.jsonl.gz")
LORA = dict(rank=16, alpha=32.0, targets=["q", "k", "v", "proj"])
HF_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
BETA, LR = 0.1, 5e-6


def make_base(root: Path, n_pairs: int, side: int) -> tuple[Path, list[dict]]:
    """A speedrun-size LLaMA (4 layers, dim 256) with a BPE trained on the pairs, and the first `n_pairs` pairs whose
    prompt and replies each fit `side` tokens under it."""
    pairs, _ = read_pairs(str(HH), "hh_rlhf", limit=2000)
    texts = [" ".join(m["content"] for m in p.prompt) + "\n" + p.chosen + "\n" + p.rejected for p in pairs]
    tokenizer = Tokenizer.train(texts, 8192)
    cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=704, max_seq_len=512)
    run = root / "base"
    tokenizer.save(run)
    save_checkpoint(run, 0, build_model(cfg, seed=0), state={})
    picked = []
    for p in pairs:
        prompt, chosen = encode_reply(tokenizer, p.prompt, p.chosen)
        _, rejected = encode_reply(tokenizer, p.prompt, p.rejected)
        if max(len(prompt), len(chosen), len(rejected)) <= side:
            picked.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
        if len(picked) == n_pairs + 1:  # one more: ours holds one pair out
            break
    return run, picked


def ours(base: Path, data: Path, root: Path, method: str, steps: int, batch: int) -> float:
    cfg = AlignConfig(
        run=RunConfig(name=f"ours-{method}", root=str(root)),
        method="dpo",
        policy=str(base),
        data=AlignDataConfig(path=str(data), format="pairs", val_fraction=0.01),
        train=SftTrainConfig(steps=steps, batch_size=batch, lr=LR, warmup_steps=0, log_every=steps, samples=0),
        peft=PeftConfig(method=method, **(LORA if method == "lora" else {})),
        dpo=DpoConfig(loss="sigmoid", beta=BETA),
    )
    out = preference.train(cfg, Run.from_config(cfg.run))
    return steps * batch / (out["reference_seconds"] + out["train_seconds"])


TRL_SETTINGS = {
    "default": {},
    "fastest": dict(precompute_ref_log_probs=True, gradient_checkpointing=False),
}


def trl(export: Path, records: list[dict], root: Path, method: str, steps: int, batch: int, setting: str) -> float:
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    spent = {"reference": 0.0}

    class Timed(DPOTrainer):  # the precompute runs in __init__: time it as part of the work
        def _precompute_ref_logps(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            spent["reference"] += time.perf_counter() - t0
            return out

    rows = [
        {
            "prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in records
    ]
    args = DPOConfig(
        output_dir=str(root / f"trl-{method}-{setting}"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LR,
        beta=BETA,
        max_length=512,
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
    trainer = Timed(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
    )
    t0 = time.perf_counter()
    trainer.train()
    return steps * batch / (time.perf_counter() - t0 + spent["reference"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", type=int, default=128, help="most tokens of the prompt and of each reply")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = parser.parse_args()
    require_data(HH)
    threads = set_threads(args.threads or None)
    n_pairs = args.steps * args.batch
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        root = Path(tmp)
        base, records = make_base(root, n_pairs, args.side)
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        export = export_hf(base, root / "export")
        rows = []
        for method in args.methods.split(","):
            ours_pps = ours(base, data, root, method, args.steps, args.batch)
            theirs = {s: trl(export, records[:n_pairs], root, method, args.steps, args.batch, s) for s in TRL_SETTINGS}
            rows.append((method, ours_pps, theirs))
    print(
        f"\npairs/s, {args.steps} steps of {args.batch} pairs (<= {args.side} tokens a side), fp32, {threads} threads"
    )
    print(
        f"{'method':<8}{'lmforge':>10}"
        + "".join(f"{'TRL ' + s:>14}" for s in TRL_SETTINGS)
        + "  vs default  vs fastest"
    )
    for method, ours_pps, theirs in rows:
        cells = "".join(f"{theirs[s]:>14.2f}" for s in TRL_SETTINGS)
        print(
            f"{method:<8}{ours_pps:>10.2f}{cells}{ours_pps / theirs['default']:>11.2f}x"
            f"{ours_pps / theirs['fastest']:>11.2f}x"
        )


if __name__ == "__main__":
    main()
