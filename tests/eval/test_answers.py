"""Answer extraction and scores against lm-eval's own code: GSM8K's regex filters and exact_match with the task's
settings (tasks/gsm8k/gsm8k.yaml), and SQuAD's normalised exact match and F1 (lm-eval's MLQA copy of the official
script, English)."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.eval import answers

REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = 72 altogether.\n#### 72"
COMPLETIONS = [
    " She sold 48/2 = 24 in May, so 48 + 24 = 72.\n#### 72",
    " The answer is $72.",
    " #### 1,072\nQuestion:",
    " 72.0 clips, not 71",
    " I cannot say.",
    " -5 and then #### -3.5",
    " total: 7,2",
    "",
]


def lm_eval_gsm8k(completion: str, reference: str) -> dict[str, float]:
    from pathlib import Path

    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    spec = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    metric = {k: v for k, v in spec["metric_list"][0].items() if k in ("ignore_case", "ignore_punctuation")}
    scores = {}
    for name, f in (("exact_match_strict", spec["filter_list"][0]), ("exact_match_flexible", spec["filter_list"][1])):
        args = {k: v for k, v in f["filter"][0].items() if k != "function"}
        extracted = RegexFilter(**args).apply([[completion]], [{}])[0][0]
        result = exact_match_hf_evaluate(
            [extracted], [reference], regexes_to_ignore=spec["metric_list"][0]["regexes_to_ignore"], **metric
        )
        scores[name] = float(result["exact_match"])
    return scores


def test_gsm8k_extraction_scores_as_lm_eval():
    for completion in COMPLETIONS:
        assert answers.gsm8k_scores(completion, REFERENCE) == lm_eval_gsm8k(completion, REFERENCE), completion
    assert answers.gsm8k_scores(COMPLETIONS[0], REFERENCE) == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="0123456789 .,$#-abc\n", max_size=30))
def test_gsm8k_extraction_matches_lm_eval_on_arbitrary_text(completion):
    assert answers.gsm8k_scores(completion, REFERENCE) == lm_eval_gsm8k(completion, REFERENCE)


def test_squad_scores_equal_the_official_script():
    from lm_eval.tasks.mlqa.utils import exact_match_score, f1_score

    truths = ["Denver Broncos", "the Denver Broncos", "Broncos"]
    for prediction in ["The Denver Broncos!", "denver", "Carolina Panthers", " Broncos of Denver", "", "a an the"]:
        got = answers.squad_scores(prediction, truths)
        assert got["exact_match"] == max(float(exact_match_score(prediction, t, "en")) for t in truths)
        assert got["f1"] == max(f1_score(prediction, t, "en") for t in truths)
