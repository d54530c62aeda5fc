"""Answers out of generated text and their scores: SQuAD v1.1's normalised exact match and token F1 (Rajpurkar et al.,
2016, the official evaluate-v1.1.py), and GSM8K's strict and flexible extraction as lm-eval 0.4's gsm8k.yaml."""

from __future__ import annotations

import collections
import re
import string

# lm-eval 0.4 tasks/gsm8k/gsm8k.yaml: filter_list and metric_list (exact_match with these regexes_to_ignore)
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
INVALID = "[invalid]"


def regex_extract(pattern: re.Pattern, text: str, group_select: int = 0) -> str:
    """lm-eval's RegexFilter: the `group_select`-th match (of a pattern with groups, its first non-empty group),
    stripped, or "[invalid]"."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def lm_eval_exact_match(prediction: str, reference: str, ignore: list[str], ignore_case: bool = True) -> float:
    """lm-eval's exact_match (Hugging Face evaluate's): both sides without what the `ignore` regexes match, compared."""
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return float(prediction == reference)


def gsm8k_scores(completion: str, reference: str) -> dict[str, float]:
    """exact_match_strict (`#### N`) and exact_match_flexible (the last number) of a completion against a GSM8K answer
    (its chain of thought ending in `#### N`)."""
    strict = regex_extract(GSM8K_STRICT, completion)
    flexible = regex_extract(GSM8K_FLEXIBLE, completion, group_select=-1)
    return {
        "exact_match_strict": lm_eval_exact_match(strict, reference, GSM8K_IGNORE),
        "exact_match_flexible": lm_eval_exact_match(flexible, reference, GSM8K_IGNORE),
    }


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, truths: list[str]) -> dict[str, float]:
    """exact_match and f1, each the best over the gold answers (as evaluate-v1.1.py)."""
    return {
        "exact_match": max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths),
        "f1": max(squad_f1(prediction, t) for t in truths),
    }
