"""Text normalization: NFC, control characters, whitespace runs, blank lines, empty documents."""

import unicodedata

from lmforge.data.normalize import normalize


def test_nfc_and_control_characters():
    text, reason = normalize("Cafe\u0301\x00 ok\u200b\ufeff\r\nnext\x0cline")
    assert reason is None
    assert text == "Café ok\nnext line"
    assert unicodedata.is_normalized("NFC", text)


def test_whitespace_runs_trailing_and_blank_lines():
    text, _ = normalize("\n\na  b\t\tc   \n\n\n\n\nd \n")
    assert text == "a b c\n\nd"


def test_leading_indentation_is_kept_for_code():
    text, _ = normalize("def f():\n    return  1\n\tpass")
    assert text == "def f():\n    return 1\n\tpass"


def test_only_whitespace_and_controls_is_empty():
    assert normalize(" \x00\u200b\n\n\t \r\n") == ("", "empty_after_normalize")
    assert normalize("") == ("", "empty_after_normalize")


def test_normalize_is_idempotent():
    once, _ = normalize("  x\u00a0\u00a0y \n\n\n z\u0301 ")
    assert normalize(once) == (once, None)


def test_inner_whitespace_runs_become_one_space_whatever_their_mix():
    import random
    import re

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", " ", "\t", "\n", "  ", " \t", "\t "]) for _ in range(40))
        reference = re.sub(r"[ \t]+$", "", re.sub(r"(?<=\S)[ \t]+", " ", text), flags=re.MULTILINE)
        reference = re.sub(r"\n{3,}", "\n\n", reference).strip("\n")
        assert normalize(text)[0] == (reference if reference.strip() else "")
