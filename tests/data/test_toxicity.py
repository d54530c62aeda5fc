"""Word-list toxicity filter against the LDNOOBW English list."""

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.data.toxicity import SCORERS, ToxicityConfig, load_terms, resolve_scorer, toxic_ratio, toxicity_reason
from lmforge.errors import LmforgeError

LDNOOBW = Path(__file__).resolve().parents[1] / "fixtures/ldnoobw_en.txt"


@pytest.fixture(scope="module")
def terms():
    return load_terms(LDNOOBW)


def test_whole_word_case_insensitive(terms):
    assert toxic_ratio("What a BASTARD he is", terms) == pytest.approx(1 / 5)
    assert toxic_ratio("the bastardized edition", terms) == 0.0  # not a whole-word match
    assert toxic_ratio("", terms) == 0.0


def test_multi_word_terms_match_as_phrases(terms):
    assert ("girls", "gone", "wild") in terms
    assert toxic_ratio("they watched girls gone wild today", terms) == pytest.approx(3 / 6)
    assert toxic_ratio("the girls went wild", terms) == 0.0


def test_reason_uses_max_ratio(terms):
    text = "bastard " + "clean words here " * 20  # 1 of 61 words
    assert toxicity_reason(text, ToxicityConfig(max_ratio=0.01), terms) == "toxic_words"
    assert toxicity_reason(text, ToxicityConfig(max_ratio=0.05), terms) is None
    assert toxicity_reason(text, ToxicityConfig(), frozenset()) is None  # no list: filter off


def test_comments_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "terms.txt"
    path.write_text("# a comment\n\nBad Word\nugh\n")
    assert load_terms(path) == {("bad", "word"), ("ugh",)}


def test_config_rejects_missing_list_and_bad_ratio(tmp_path):
    with pytest.raises(LmforgeError, match="toxicity.wordlist"):
        load_config(ToxicityConfig, None, [f"wordlist={tmp_path / 'nope.txt'}"])
    with pytest.raises(LmforgeError, match="toxicity.max_ratio"):
        load_config(ToxicityConfig, None, ["max_ratio=2"])


def shouting(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


def test_classifier_score_above_max_score_is_toxic_score(terms):
    cfg = ToxicityConfig(classifier="shouting", max_score=0.5)
    assert toxicity_reason("WHAT ARE YOU DOING", cfg, frozenset(), shouting) == "toxic_score"
    assert toxicity_reason("What are you doing", cfg, frozenset(), shouting) is None
    assert toxicity_reason("What a BASTARD", cfg, terms, shouting) == "toxic_words"  # the word list decides first


def test_scorers_come_from_the_registry_or_the_caller(monkeypatch):
    assert resolve_scorer(ToxicityConfig()) is None
    with pytest.raises(LmforgeError, match=r"toxicity.classifier='shouting' is not a known scorer \(choices: none"):
        resolve_scorer(ToxicityConfig(classifier="shouting"))
    assert resolve_scorer(ToxicityConfig(classifier="shouting"), {"shouting": shouting}) is shouting
    monkeypatch.setitem(SCORERS, "shouting", shouting)
    assert resolve_scorer(ToxicityConfig(classifier="shouting")) is shouting
    with pytest.raises(LmforgeError, match="toxicity.max_score"):
        load_config(ToxicityConfig, None, ["max_score=1.5"])
