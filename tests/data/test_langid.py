"""Language identification: English prose kept, a German paragraph and unclear text rejected with their reasons."""

import sys
from pathlib import Path

import pytest

from lmforge.config import from_dict
from lmforge.data.langid import LangIdConfig, language_reason, load_identifier
from lmforge.errors import LmforgeError

GERMAN = Path(__file__).resolve().parents[1] / "fixtures/german.txt"
ENGLISH = (
    "The committee met on Tuesday morning to review the budget for the new library. After a long discussion, "
    "the members agreed that the reading room should stay open later in the evening during the winter months."
)


@pytest.fixture(scope="module")
def identifier():
    return load_identifier()


def test_keeps_english_and_rejects_german(identifier):
    cfg = LangIdConfig()
    assert language_reason(ENGLISH, cfg, identifier) is None
    assert language_reason(GERMAN.read_text()[:2000], cfg, identifier) == "lang_de"
    assert language_reason(GERMAN.read_text()[:2000], LangIdConfig(keep=["en", "de"]), identifier) is None


def test_unclear_text_has_a_low_score(identifier):
    assert language_reason("12345 67890", LangIdConfig(), identifier) == "low_lang_score"


def test_config_is_validated():
    with pytest.raises(LmforgeError, match="min_score"):
        from_dict(LangIdConfig, {"min_score": 1.5})
    with pytest.raises(LmforgeError, match="not a code"):
        from_dict(LangIdConfig, {"keep": ["English"]})
    with pytest.raises(LmforgeError, match="drop every document"):
        from_dict(LangIdConfig, {"keep": []})


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "langid.langid", None)
    with pytest.raises(LmforgeError, match="pip install langid"):
        load_identifier()
