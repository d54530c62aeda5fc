"""BLEU and chrF equal sacrebleu's API and CLI on WMT22 segments, ROUGE follows rouge-score's stemmed F-measure,
and our BERTScore equals bert-score on the same all-MiniLM-L6-v2 encoder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.nlg import BERTSCORE_LAYERS, bertscore_f1, bertscore_model_dir, bleu, chrf, rouge

WMT22 = Path(__file__).resolve().parents[1] / "fixtures/wmt22"


def lines(name: str) -> list[str]:
    return (WMT22 / name).read_text(encoding="utf-8").splitlines()


def test_bleu_and_chrf_equal_sacrebleu_api_with_one_and_two_references():
    hyps, ref_a, ref_b = lines("en-de.hyp.Online-B.de"), lines("en-de.ref.A.de"), lines("en-de.ref.B.de")
    assert bleu(hyps, ref_a) == sacrebleu.corpus_bleu(hyps, [ref_a]).score
    assert chrf(hyps, ref_a) == sacrebleu.corpus_chrf(hyps, [ref_a]).score
    both = [[a, b] for a, b in zip(ref_a, ref_b, strict=True)]
    assert bleu(hyps, both) == sacrebleu.corpus_bleu(hyps, [ref_a, ref_b]).score
    assert bleu(hyps, both) > bleu(hyps, ref_a)  # a second reference only adds matches
    # a segment with fewer references: sacrebleu skips the missing ones (None)
    ragged = [[a] if i % 2 else [a, b] for i, (a, b) in enumerate(zip(ref_a, ref_b, strict=True))]
    ref_b_half = [b if i % 2 == 0 else None for i, b in enumerate(ref_b)]
    assert bleu(hyps, ragged) == sacrebleu.corpus_bleu(hyps, [ref_a, ref_b_half]).score
    zh_hyps, zh_ref = lines("en-zh.hyp.Online-B.zh"), lines("en-zh.ref.A.zh")
    assert bleu(zh_hyps, zh_ref, tokenize="zh") == sacrebleu.corpus_bleu(zh_hyps, [zh_ref], tokenize="zh").score


def test_bleu_and_chrf_equal_the_sacrebleu_command_line():
    hyp, ref = WMT22 / "en-de.hyp.Online-B.de", WMT22 / "en-de.ref.A.de"
    cmd = [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-b", "-w", "4"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)  # -b: scores only
    hyps, refs = lines(hyp.name), lines(ref.name)
    assert out == [round(bleu(hyps, refs), 4), round(chrf(hyps, refs), 4)]


def test_metrics_name_mismatched_lengths():
    with pytest.raises(LmforgeError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(LmforgeError, match="no hypotheses"):
        rouge([], [])


def test_rouge_is_the_stemmed_f_measure_mean():
    scores = rouge(["the cat sat on the mat", "cats running"], ["the cat was on the mat", "cat runs"])
    # pair 1: 5 of 6 unigrams (P = R = 5/6), bigrams "the cat", "on the", "the mat" of 5 each, LCS 5 of 6;
    # pair 2: stemming makes "cats running" / "cat runs" the same two words.
    assert scores["rouge1"] == pytest.approx((5 / 6 + 1) / 2)
    assert scores["rouge2"] == pytest.approx((3 / 5 + 1) / 2)
    assert scores["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
    assert rouge(["a b c"], ["d e f"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


@pytest.fixture
def one_thread():
    # two threads on a busy 2-core machine spin: this test takes twice the CPU time with them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bertscore_equals_bert_score_on_the_same_encoder(monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bert_score = pytest.importorskip("bert_score")
    hyps = lines("en-de.hyp.Online-B.de")[:12] + ["The cat sat on the mat.", "same words here"]
    refs = lines("en-de.ref.A.de")[:12] + ["A cat was sitting on the mat.", "same words here"]
    _, _, f1 = bert_score.score(
        hyps, refs, model_type=bertscore_model_dir(), num_layers=BERTSCORE_LAYERS, device="cpu", batch_size=8
    )
    ours = bertscore_f1(hyps, refs)
    assert abs(ours - f1.mean().item()) < 1e-5
    # bert-score 0.3.12 cannot encode "" under transformers 5; it scores an empty side 0, as we do
    assert bertscore_f1(["", "x"], ["not empty", ""]) == 0.0
    assert bertscore_f1(["same words here"], ["same words here"]) == pytest.approx(1.0, abs=1e-6)
    assert bertscore_f1(["the weather is cold today"], ["it is cold today"]) > bertscore_f1(
        ["the weather is cold today"], ["quantum chromodynamics lecture"]
    )
