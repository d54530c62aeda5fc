import dataclasses
from itertools import product

import pytest

from lmforge.config import from_dict
from lmforge.data.quality import CodeQualityConfig, QualityConfig, code_quality_reasons, quality_reasons
from lmforge.errors import LmforgeError

CLEAN = """The river runs through the middle of the old town, and most people who live there cross it twice a day.
In the morning the bridges are busy with bicycles, delivery vans and children walking to school with their parents.
By noon the market square fills with stalls that sell bread, cheese, fresh fish and flowers from the valley.
Visitors often ask why the houses near the water are painted in such bright colours.
The answer is simple: fishermen wanted to recognise their own homes from far out on the lake.
Today the boats are fewer, but the tradition has survived, and every spring the owners repaint their walls.
In the evening the lamps are lit along the quay, and the town grows quiet again."""
LINES = CLEAN.splitlines()
NO_STOP = (
    "Rain fell softly across quiet hills while farmers gathered apples, pears and plums before winter arrived. "
    "Children ran between wooden barns, laughing loudly, chasing geese around muddy ponds. Later, mothers "
    "called everyone inside for warm soup, fresh bread, sweet cider. Evening light faded slowly behind distant "
    "mountains; owls began hunting mice near old stone walls. Nobody noticed how quickly another year passed, "
    "since every season brought its own work, songs, worries, small joys."
).replace(" and ", " plus ")
SHORT = " ".join("".join(p) for p in product("bcdfghklm", "aeiou")) + " to be of the and by it at is on so"
LONG = " ".join("".join(p) for p in product(["extra", "ordin", "arily", "compl"], repeat=3)) + " the and"
REPETITION = (
    "max_dup_line_frac",
    "max_dup_line_char_frac",
    "max_dup_para_frac",
    "max_dup_para_char_frac",
)
NGRAMS = ("max_top_ngram_frac", "max_dup_ngram_frac")


def relaxed(**keep) -> QualityConfig:
    """Default config with every repetition rule off except those given."""
    off = {k: 1.0 for k in REPETITION} | {"max_top_ngram_frac": (1.0,) * 3, "max_dup_ngram_frac": (1.0,) * 6}
    return QualityConfig(**(off | keep))


DEFAULT = QualityConfig()
CASES = [
    ("too_few_words", LINES[0], relaxed()),  # in 21 words any 4-gram is "top"
    ("too_many_words", CLEAN, QualityConfig(max_words=100)),
    ("short_words", SHORT, DEFAULT),
    ("long_words", LONG, DEFAULT),
    ("symbols", CLEAN.replace("the ", "the #"), DEFAULT),
    ("bullet_lines", "\n".join("- " + line for line in LINES), DEFAULT),
    ("ellipsis_lines", "\n".join(line[:-1] + "..." if i < 3 else line for i, line in enumerate(LINES)), DEFAULT),
    ("few_alpha_words", CLEAN + " " + " ".join(str(i) for i in range(40)), DEFAULT),
    ("no_stop_words", NO_STOP, DEFAULT),
    ("no_terminal_punct", CLEAN.replace(".", ""), QualityConfig(min_terminal_punct_line_frac=0.5)),
    ("dup_lines", CLEAN + "\nShare this page." * 5, relaxed(max_dup_line_frac=0.3)),
    ("dup_line_chars", "\n".join(LINES + LINES[:2]), relaxed(max_dup_line_char_frac=0.2)),
    ("dup_paras", "\n\n".join([CLEAN] + ["Read more."] * 3), relaxed(max_dup_para_frac=0.3)),
    ("dup_para_chars", "\n\n".join([CLEAN, LINES[1] + " " + LINES[2]] * 2), relaxed(max_dup_para_char_frac=0.2)),
    ("top_2gram", CLEAN + " new york" * 30, relaxed(max_top_ngram_frac=(0.2, 1.0, 1.0))),
    ("top_3gram", CLEAN + " in new york" * 20, relaxed(max_top_ngram_frac=(1.0, 0.18, 1.0))),
    ("top_4gram", CLEAN + " at the new york" * 20, relaxed(max_top_ngram_frac=(1.0, 1.0, 0.16))),
    ("dup_5gram", CLEAN + " " + " ".join(LINES[:2]), relaxed(max_dup_ngram_frac=(0.15,) + (1.0,) * 5)),
    ("dup_10gram", CLEAN + " " + " ".join(LINES[:2]), relaxed(max_dup_ngram_frac=(1.0,) * 5 + (0.10,))),
    ("lorem_ipsum", CLEAN + " Lorem ipsum dolor sit amet.", DEFAULT),
]


def test_clean_prose_passes():
    assert len(CLEAN.split()) >= 80
    assert quality_reasons(CLEAN, DEFAULT) == []
    assert quality_reasons(NO_STOP.replace("plus", "and") + " The end of the year.", DEFAULT) == []


@pytest.mark.parametrize(("rule", "text", "cfg"), CASES, ids=[c[0] for c in CASES])
def test_each_rule_fails_alone(rule, text, cfg):
    assert quality_reasons(text, cfg) == [rule]


def test_repetitive_text_fails_repetition_rules():
    reasons = quality_reasons("\n\n".join([CLEAN] * 3), DEFAULT)
    assert {"dup_lines", "dup_line_chars", "dup_paras", "dup_para_chars", "dup_5gram", "dup_10gram"} <= set(reasons)


def test_empty_text():
    assert quality_reasons("", DEFAULT) == ["too_few_words"]
    assert code_quality_reasons("  \n", CodeQualityConfig()) == ["empty"]


PYTHON = '''def mean(values: list[float]) -> float:
    """Arithmetic mean of a non-empty list."""
    if not values:
        raise ValueError("mean of an empty list")
    total = 0.0
    for v in values:
        total += v
    return total / len(values)
'''


@pytest.mark.parametrize(
    ("rule", "text", "cfg"),
    [
        ("long_line", PYTHON + "x = [" + "1," * 2500 + "]\n", CodeQualityConfig(max_mean_line_length=10_000)),
        ("long_mean_line", "\n".join(["value = compute(" + "a + " * 40 + "b)"] * 5), CodeQualityConfig()),
        ("low_alnum", "{\n" + "  [{}, {}, {}], \n" * 20 + "}\n", CodeQualityConfig()),
        ("autogenerated", "# This file is auto-generated. Do not edit.\n" + PYTHON, CodeQualityConfig()),
    ],
)
def test_code_rules(rule, text, cfg):
    assert code_quality_reasons(text, cfg) == [rule]


def test_code_passes_and_minified_fails():
    cfg = CodeQualityConfig()
    assert code_quality_reasons(PYTHON, cfg) == []
    minified = "var a=function(b){return b+1};" * 170
    assert len(minified) > 5000 and "long_line" in code_quality_reasons(minified, cfg)
    assert code_quality_reasons(PYTHON + "\n" * 10 + "# generated by hand, later\n", cfg) == []


@pytest.mark.parametrize(
    ("cls", "values", "key"),
    [
        (QualityConfig, {"min_words": -1}, "quality.min_words"),
        (QualityConfig, {"min_words": 10, "max_words": 5}, "quality.min_words"),
        (QualityConfig, {"max_dup_line_frac": 1.5}, "quality.max_dup_line_frac"),
        (QualityConfig, {"min_mean_word_len": 12.0}, "quality.min_mean_word_len"),
        (QualityConfig, {"max_top_ngram_frac": [0.2, 0.1]}, "quality.max_top_ngram_frac"),
        (QualityConfig, {"max_dup_ngram_frac": [0.1, 0.1, 0.1, 0.1, 0.1, 2.0]}, "quality.max_dup_ngram_frac"),
        (CodeQualityConfig, {"max_line_length": 0}, "code_quality.max_line_length"),
        (CodeQualityConfig, {"min_alnum_frac": -0.1}, "code_quality.min_alnum_frac"),
        (CodeQualityConfig, {"autogenerated_markers": [""]}, "code_quality.autogenerated_markers"),
    ],
)
def test_bad_config_names_key(cls, values, key):
    with pytest.raises(LmforgeError, match=key.replace(".", r"\.")):
        from_dict(cls, values)


def test_config_loads_from_plain_values():
    cfg = from_dict(QualityConfig, {"max_top_ngram_frac": [0.3, 0.2, 0.1], "min_words": 10})
    assert cfg.max_top_ngram_frac == (0.3, 0.2, 0.1)
    assert dataclasses.asdict(cfg)["min_words"] == 10


def test_ngram_fracs_match_a_plain_counter_implementation():
    import random
    from collections import Counter

    from lmforge.data.quality import ngram_fracs

    def reference(words: list[str], total: int) -> tuple[list[float], list[float]]:
        top, dup = [], []
        for n in range(2, 11):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            if n < 5:
                gram, count = grams.most_common(1)[0] if grams else ((), 0)  # first seen wins a tie
                top.append(count * sum(map(len, gram)) / total)
            else:
                covered = [False] * len(words)
                for i in range(len(words) - n + 1):
                    if grams[tuple(words[i : i + n])] > 1:
                        covered[i : i + n] = [True] * n
                dup.append(sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total)
        return top, dup

    rng = random.Random(0)
    for _ in range(300):
        vocab = [rng.choice(["a", "bb", "ccc", "the", "river"]) + str(i) for i in range(rng.randint(1, 12))]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 60))]
        if rng.random() < 0.3:  # a repeated passage, as in scraped boilerplate
            words += words[: rng.randint(0, len(words))]
        total = sum(map(len, words)) or 1
        top, dup = ngram_fracs(words, total, range(2, 5), range(5, 11))
        ref_top, ref_dup = reference(words, total)
        assert top == pytest.approx(ref_top) and dup == pytest.approx(ref_dup), words


@pytest.mark.parametrize("extra", [0, 1, 50])
def test_the_pipeline_word_limit_gives_the_rules_first_reason(extra):
    # stages.quality_reason counts words up to the limit instead of listing them all (a 50 MB document is ~9M words)
    from lmforge.data.config import DataPrepConfig
    from lmforge.data.corpus import Document
    from lmforge.data.stages import quality_reason

    cfg = DataPrepConfig(quality=QualityConfig(max_words=120))
    words = CLEAN.split()
    text = "\u3000\n".join(words[i % len(words)] for i in range(120 + extra))  # ideographic spaces split words too
    expected = quality_reasons(text, cfg.quality)
    assert quality_reason(Document("a.txt", text), cfg) == (expected[0] if expected else None)
    assert (expected[:1] == ["too_many_words"]) == (extra > 0)
