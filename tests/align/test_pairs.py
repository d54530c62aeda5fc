"""Preference pairs from hh-rlhf transcripts, stack-exchange answers and plain records against the raw records; the
split keeps each prompt on one side; bad records are counted by reason and nothing usable is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.align.config import AlignDataConfig
from lmforge.align.pairs import load_pairs, prompt_key, read_pairs
from lmforge.errors import LmforgeError

FIXTURES = Path(__file__).parent.parent / "fixtures"
HH = FIXTURES / "preference_hh_rlhf_40.jsonl"
SE = FIXTURES / "preference_stack_exchange_6.json"


def test_hh_rlhf_pairs_are_the_last_assistant_turns_after_the_shared_prompt():
    pairs, rejected = read_pairs(str(HH), "hh_rlhf")
    raw = [json.loads(line) for line in HH.read_text().splitlines()]
    assert len(pairs) + sum(rejected.values()) == len(raw) == 40 and len(pairs) >= 35
    for pair in pairs:
        assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
        assert pair.chosen != pair.rejected
    kept = [r for r in raw if any(r["chosen"].rstrip().endswith(p.chosen) for p in pairs)]
    assert len(kept) >= len(pairs) - 2  # replies are the transcripts' tails (stripped)
    first = pairs[0]
    assert raw[0]["chosen"].startswith("\n\nHuman: " + first.prompt[0]["content"])


def test_stack_exchange_prefers_response_j():
    pairs, rejected = read_pairs(str(SE), "stack_exchange")
    raw = json.loads(SE.read_text())
    assert not rejected and len(pairs) == len(raw)
    for pair, record in zip(pairs, raw, strict=True):
        assert pair.prompt == [{"role": "user", "content": record["question"]}]
        assert (pair.chosen, pair.rejected) == (record["response_j"], record["response_k"])


def write(path: Path, records: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_bad_records_are_counted_by_reason(tmp_path, tiny_tokenizer):
    good = [{"prompt": f"question {i}?", "chosen": f"answer {i}", "rejected": "no idea"} for i in range(12)]
    bad = [
        {"prompt": "same?", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a"},
        "not json {",
        [1, 2],
        {"prompt": [{"role": "user", "content": "as messages"}], "chosen": "x", "rejected": "y", "margin": 2},
        {"prompt": "long " * 300, "chosen": "a", "rejected": "b"},
    ]
    path = write(tmp_path / "p.jsonl", good + bad)
    data = load_pairs(AlignDataConfig(path=path, format="pairs", val_fraction=0.25), tiny_tokenizer, 128)
    assert data.rejected == {
        "chosen and rejected are identical": 1,
        "malformed: 'rejected' missing or not text": 1,
        "malformed: not a JSON object": 2,
        "longer than data.max_len (129 tokens)": 1,
    }
    assert len(data.train) + len(data.val) == 13 and len(data.val) == 3
    assert sorted(p.margin for p in data.train + data.val)[-1] == 2.0
    hh = [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hello"}] * 2
    _, rejected = read_pairs(write(tmp_path / "hh.jsonl", hh), "hh_rlhf")
    assert rejected == {"no assistant turn at the end of a transcript": 2}


def test_one_prompt_never_lands_on_both_sides(tmp_path, tiny_tokenizer):
    records = [{"prompt": f"q{i % 7}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(28)]
    path = write(tmp_path / "p.jsonl", records)
    data = load_pairs(AlignDataConfig(path=path, format="pairs", val_fraction=0.3), tiny_tokenizer, 128)
    train = {tuple(p.prompt) for p in data.train}
    val = {tuple(p.prompt) for p in data.val}
    assert train and val and not train & val and len(data.val) == 2 * 4  # 2 of 7 prompts, 4 pairs each
    assert len({prompt_key(p.prompt) for p in data.val_pairs}) == 2


def test_nothing_usable_is_one_error_naming_the_file_and_the_fix(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.raises(LmforgeError, match=r"p\.jsonl leaves 0 training .*1 chosen and rejected are identical.*give"):
        load_pairs(AlignDataConfig(path=path, format="pairs"), tiny_tokenizer, 128)
