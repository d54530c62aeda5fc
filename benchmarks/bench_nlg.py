"""Generation metrics against their references on full test sets: our BLEU and chrF on WMT22 system outputs vs the
organisers' published scores (automatic-scores.tsv), and our BERTScore vs bert-score on the same encoder and
segments, with the time each takes.

    .venv/bin/python benchmarks/bench_nlg.py --wmt22 ../shared/data/translation/wmt22      # ~1 min on 2 cores
    .venv/bin/python benchmarks/bench_nlg.py --wmt22 DIR --bertscore-segments 2037

WMT22 scored with sacrebleu 2.6.0 defaults (BLEU tokenizer 13a, zh for Chinese targets); "bleu-all" uses references
A and B. The BERTScore check runs en-de Online-B against reference A.
Measured (Dec 2026, 2 busy cores): all 24 BLEU/chrF figures of 8 systems equal the published ones exactly (difference
0.0); BERTScore F1 on 500 segments 0.8472042 for both, difference 4.4e-08; both take ~50 s of wall time there.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from lmforge.eval.nlg import BERTSCORE_LAYERS, bertscore_f1, bertscore_model_dir, bleu, chrf  # noqa: E402

SYSTEMS = [("en-de", "Online-B"), ("en-de", "OpenNMT"), ("en-de", "PROMT"), ("de-en", "Online-B"), ("de-en", "LT22")]
SYSTEMS += [("zh-en", "Online-B"), ("zh-en", "LanguageX"), ("en-zh", "Online-B")]


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def wmt22(folder: Path) -> None:
    published = {}
    with open(folder / "automatic-scores.tsv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            published[row["pair"], row["system"], row["metric"]] = float(row["score"])
    print(f"{'pair':6} {'system':10} {'metric':9} {'ours':>9} {'published':>9} {'diff':>9}")
    worst = 0.0
    for pair, system in SYSTEMS:
        src, tgt = pair.split("-")
        stem = folder / f"generaltest2022.{pair}"
        hyps = lines(Path(f"{stem}.hyp.{system}.{tgt}"))
        ref_a, ref_b = lines(Path(f"{stem}.ref.A.{tgt}")), lines(Path(f"{stem}.ref.B.{tgt}"))
        tok = "zh" if tgt == "zh" else None
        ours = {
            "bleu-A": bleu(hyps, ref_a, tokenize=tok),
            "bleu-all": bleu(hyps, [[a, b] for a, b in zip(ref_a, ref_b, strict=True)], tokenize=tok),
            "chrf-A": chrf(hyps, ref_a),
        }
        for metric, value in ours.items():
            ref = published[pair, system, metric]
            worst = max(worst, abs(value - ref))
            print(f"{pair:6} {system:10} {metric:9} {value:9.4f} {ref:9.4f} {value - ref:9.1e}")
    print(f"largest difference from the published scores: {worst:.1e}")


def bertscore(folder: Path, n: int) -> None:
    import bert_score

    os.environ["HF_HUB_OFFLINE"] = "1"
    hyps = lines(folder / "generaltest2022.en-de.hyp.Online-B.de")[:n]
    refs = lines(folder / "generaltest2022.en-de.ref.A.de")[:n]
    keep = [i for i in range(len(hyps)) if hyps[i].strip() and refs[i].strip()]  # bert-score fails on "" here
    hyps, refs = [hyps[i] for i in keep], [refs[i] for i in keep]
    bertscore_f1(hyps[:2], refs[:2])  # load the model outside the timing, as bert-score's first call below does not
    t = time.perf_counter()
    ours = bertscore_f1(hyps, refs)
    t_ours = time.perf_counter() - t
    path = bertscore_model_dir()
    t = time.perf_counter()
    _, _, f1 = bert_score.score(hyps, refs, model_type=path, num_layers=BERTSCORE_LAYERS, device="cpu")
    t_ref = time.perf_counter() - t
    print(
        f"BERTScore F1 on {len(hyps)} en-de segments: ours {ours:.7f} ({t_ours:.1f} s), bert-score "
        f"{f1.mean().item():.7f} ({t_ref:.1f} s with model load), diff {abs(ours - f1.mean().item()):.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wmt22", required=True, type=Path, help="folder of the WMT22 test sets and scores")
    parser.add_argument("--bertscore-segments", type=int, default=500)
    args = parser.parse_args()
    wmt22(args.wmt22)
    bertscore(args.wmt22, args.bertscore_segments)


if __name__ == "__main__":
    main()
