"""The speedrun's compression stage: the pre-trained run quantized by round to nearest (int8 per channel, int4 per
group) and by GPTQ calibrated on its own training text, each with its size and held-out perplexity against the base's,
in the run's compress section (the compressed runs are `<run>-<method>`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

from lmforge.checkpoint import load_run
from lmforge.compress import main as compress_main
from lmforge.compress.config import CalibrationConfig, CompressConfig, QuantConfig
from lmforge.eval.backends import Local
from lmforge.eval.heldout import heldout_texts
from lmforge.run import Run, RunConfig

# method -> its quant settings (4-bit methods in groups of 64: the speedrun model's widths are 256 and 512)
METHODS = {"int8": QuantConfig(bits=8), "int4": QuantConfig(group_size=64), "gptq": QuantConfig(group_size=64)}


def perplexity(run_dir, texts: list[str]) -> float:
    model, tokenizer = load_run(run_dir)
    backend = Local(model, tokenizer)
    nll, tokens = 0.0, 0
    for text in texts:
        n, t = backend.rolling_nll(text)
        nll, tokens = nll + n, tokens + t
    return math.exp(nll / tokens)


def main(run: Run, run_cfg: RunConfig, methods: list[str] | tuple[str, ...] = tuple(METHODS)) -> dict[str, float]:
    t0 = time.perf_counter()
    texts = [json.loads(line)["text"] for line in run.file("eval/heldout.jsonl").read_text().splitlines()]
    _, tokenizer = load_run(run.path)
    calibration = run.write_text(
        "compress_calibration.txt", "\n\n".join(heldout_texts(run.file("data/train"), tokenizer, 300_000))
    )
    base_ppl = perplexity(run.path, texts)
    rows = {
        "base": {"perplexity": round(base_ppl, 3), "size_mib": round(compress_main.weights_bytes(run.path) / 2**20, 2)}
    }
    for method in methods:
        cfg = CompressConfig(
            run=replace(run_cfg, name=f"{run_cfg.name}-{method}"),
            base=str(run.path),
            method=method,
            quant=METHODS[method],
            calibration=CalibrationConfig(path=str(calibration), samples=64, seq_len=256),
        )
        out = Run.from_config(cfg.run)
        summary = compress_main.main(cfg, out)
        ppl = perplexity(out.path, texts)
        rows[method] = {
            "perplexity": round(ppl, 3),
            "perplexity_change_pct": round(100 * (ppl / base_ppl - 1), 2),
            "size_mib": round(summary["size_bytes"] / 2**20, 2),
            "seconds": summary["seconds"],
        }
    run.write_json("compress_config.json", {"run": {"name": run_cfg.name}, "methods": list(methods)})
    run.write_json("compress.json", rows)
    print("compression: " + ", ".join(f"{m} ppl {r['perplexity']}" for m, r in rows.items()), flush=True)
    metrics = {f"compress_{m}_perplexity": r["perplexity"] for m, r in rows.items()}
    return {**metrics, "compress_seconds": time.perf_counter() - t0}
