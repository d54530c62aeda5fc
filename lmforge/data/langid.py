"""Language identification with langid.py (Lui and Baldwin, 2012), whose model ships inside the wheel."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import check
from lmforge.errors import LmforgeError

# langid's features are byte n-grams; the first few KB decide a document's language as well as all of it and keep
# the cost per document flat.
SAMPLE_CHARS = 4000


@dataclass
class LangIdConfig:
    enabled: bool = False
    """Drop documents whose language is not in `keep` (needs the langid package)."""
    keep: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes of the languages to keep, e.g. ["en", "de"]."""
    min_score: float = 0.5
    """Drop documents whose most likely language has a lower probability than this."""

    def validate(self) -> None:
        check(bool(self.keep), "langid.keep=[] would drop every document; list language codes such as [en]")
        for code in self.keep:
            check(bool(re.fullmatch(r"[a-z]{2,3}", str(code))), f"langid.keep: {code!r} is not a code such as en")
        check(0.0 <= self.min_score <= 1.0, f"langid.min_score={self.min_score} must be between 0 and 1")


def load_identifier() -> Any:
    """langid's classifier with probabilities normalised to 0..1 (about 2 s to build)."""
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError:
        raise LmforgeError("langid.enabled=true needs the langid package; `pip install langid`") from None
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def language_reason(text: str, cfg: LangIdConfig, identifier: Any) -> str | None:
    """low_lang_score when no language is likely enough, lang_<code> for a language not kept, else None."""
    lang, score = identifier.classify(text[:SAMPLE_CHARS])
    if score < cfg.min_score:
        return "low_lang_score"
    return None if lang in cfg.keep else f"lang_{lang}"
