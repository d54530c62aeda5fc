"""GPTQ against llm-compressor's (vLLM's GPTQModifier): the same base, calibration windows, bits, groups and damping;
quantization seconds and perplexity, both scored by lmforge's evaluator (the peer's dequantized weights are imported
back with lmforge.interop.hf.import_hf).

llm-compressor lives in its own virtual environment (it pins its own transformers); make it once with:

    python3.11 -m venv /work/venvs/llmc
    /work/venvs/llmc/bin/pip install torch==2.13.0          # first: the CPU build; others pull a multi-GB CUDA one
    echo torch==2.13.0 > /tmp/c.txt && /work/venvs/llmc/bin/pip install llmcompressor -c /tmp/c.txt   # 0.14.0.1

Then (from the repository root, in lmforge's environment):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_gptq.py /work/main/runs/speedrun CALIB.txt VALID.txt \
        --peer-python /work/venvs/llmc/bin/python --group 64 --samples 128 --seq-len 256 --chars 200000
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path


def peer(hf_dir: str, windows_json: str, out_dir: str, group: int, act_order: bool, observer: str) -> None:
    """Runs in llm-compressor's environment: GPTQ W4 (symmetric, `group` columns per scale, the group ranges from
    `observer`) on every block linear, then the dequantized weights saved as a plain transformers model."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    windows = json.loads(Path(windows_json).read_text())
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    weights = QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=group,
        observer="memoryless_mse" if observer == "mse" else "memoryless_minmax",
    )
    recipe = GPTQModifier(
        config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=0.01,
        actorder="static" if act_order else None,
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=len(windows),
        max_seq_length=len(windows[0]),
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    # the weights GPTQ left in place are already its dequantized codes; drop the scales and save a plain model
    state = {k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    plain = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    missing, _ = plain.load_state_dict(state, strict=False)
    assert not [k for k in missing if "weight" in k and "lm_head" not in k], missing
    plain.save_pretrained(out_dir)
    print(json.dumps({"peer_seconds": seconds}), flush=True)


def perplexity(run: Path, text: str) -> float:
    from lmforge.checkpoint import load_run
    from lmforge.eval.backends import Local

    model, tokenizer = load_run(run)
    nll, n = Local(model, tokenizer).rolling_nll(text)
    return math.exp(nll / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("calib")
    parser.add_argument("valid")
    parser.add_argument("--peer-python", default="/work/venvs/llmc/bin/python")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chars", type=int, default=200_000)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--observer", choices=["minmax", "mse"], default="mse", help="both sides use it")
    parser.add_argument("--out", default="/tmp/bench_gptq")
    args = parser.parse_args()

    from lmforge.checkpoint import load_run
    from lmforge.compress import main as compress_main
    from lmforge.compress.calibration import calibration_windows
    from lmforge.compress.config import CompressConfig
    from lmforge.config import load_config
    from lmforge.interop.hf import export_hf, import_hf
    from lmforge.run import Run

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = [f"base={args.base}", "method=gptq", f"calibration.path={args.calib}"]
    overrides += [f"calibration.samples={args.samples}", f"calibration.seq_len={args.seq_len}"]
    overrides += [
        f"quant.group_size={args.group}",
        f"quant.act_order={str(args.act_order).lower()}",
        f"quant.observer={args.observer}",
        f"run.root={out}",
        "run.name=ours",
    ]
    cfg = load_config(CompressConfig, None, overrides)
    ours_seconds = compress_main.main(cfg, Run.from_config(cfg.run))["seconds"]

    model, tokenizer = load_run(Path(args.base))
    seq_len = min(args.seq_len, model.cfg.max_seq_len)
    windows = calibration_windows(tokenizer, args.calib, args.samples, seq_len, cfg.run.seed)  # the very windows
    (out / "windows.json").write_text(json.dumps(windows.tolist()))
    export_hf(Path(args.base), out / "hf_base")
    command = [
        args.peer_python,
        __file__,
        "--peer",
        str(out / "hf_base"),
        str(out / "windows.json"),
        str(out / "hf_peer"),
    ]
    result = subprocess.run(
        [*command, str(args.group), str(int(args.act_order)), args.observer], capture_output=True, text=True
    )
    if result.returncode:
        sys.exit(f"llm-compressor failed:\n{result.stderr[-3000:]}")
    peer_seconds = json.loads(result.stdout.strip().splitlines()[-1])["peer_seconds"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (out / "hf_base" / name).is_file():
            shutil.copy(out / "hf_base" / name, out / "hf_peer" / name)
    import_hf(out / "hf_peer", out / "peer")

    text = Path(args.valid).read_text()[: args.chars]
    ppl = {
        name: perplexity(path, text)
        for name, path in [("base", Path(args.base)), ("ours", out / "ours"), ("llm-compressor", out / "peer")]
    }
    print(
        f"GPTQ 4-bit g{args.group} act_order={args.act_order} observer={args.observer}, {len(windows)} windows of "
        f"{seq_len} tokens"
    )
    print(f"{'':16} {'perplexity':>10} {'seconds':>8}")
    print(f"{'base':16} {ppl['base']:10.3f}")
    print(f"{'lmforge':16} {ppl['ours']:10.3f} {ours_seconds:8.1f}")
    print(f"{'llm-compressor':16} {ppl['llm-compressor']:10.3f} {peer_seconds:8.1f}")
    print(
        f"ratio (lmforge / llm-compressor): perplexity {ppl['ours'] / ppl['llm-compressor']:.4f}, "
        f"time {ours_seconds / peer_seconds:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), bool(int(sys.argv[6])), sys.argv[7])
    else:
        main()
