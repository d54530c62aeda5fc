"""Instruction formats read into conversations, on slices of real files (Alpaca, hh-rlhf) and on hand-written records;
bad records are counted by reason."""

import gzip
import json
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.finetune.formats import load_conversations, read_records

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_alpaca_records_become_one_turn_each():
    records = json.loads((FIXTURES / "alpaca_20.json").read_text())
    conversations, rejected = load_conversations(FIXTURES / "alpaca_20.json", "alpaca")
    assert not rejected and len(conversations) == len(records) == 20
    for record, conv in zip(records, conversations, strict=True):
        assert [m["role"] for m in conv] == ["user", "assistant"]
        assert conv[0]["content"].startswith(record["instruction"]) and conv[1]["content"] == record["output"]
        assert (record["input"] in conv[0]["content"]) and (bool(record["input"]) == ("\n\n" in conv[0]["content"]))


def test_hh_rlhf_takes_the_chosen_transcript_turn_by_turn():
    lines = (FIXTURES / "hh_rlhf_harmless_20.jsonl").read_text().splitlines()
    conversations, rejected = load_conversations(FIXTURES / "hh_rlhf_harmless_20.jsonl", "hh_rlhf")
    assert not rejected and len(conversations) == len(lines)
    for line, conv in zip(lines, conversations, strict=True):
        chosen = json.loads(line)["chosen"]
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:], strict=False))  # turns alternate
        rebuilt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in conv)
        assert " ".join(rebuilt.split()) == " ".join(chosen.split())  # nothing lost but surrounding whitespace


def test_messages_sharegpt_and_prompt_completion(tmp_path):
    path = tmp_path / "chats.jsonl.gz"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ]  # fmt: skip
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    conversations, rejected = load_conversations(path, "messages")
    assert not rejected
    assert conversations[0][0] == {"role": "system", "content": "Be brief."}
    assert conversations[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": "Say hi", "completion": "hi"}]))
    assert load_conversations(pairs, "prompt_completion")[0] == [
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    ]


def test_bad_records_are_counted_by_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    conversations, rejected = load_conversations(path, "messages")
    assert len(conversations) == 1
    assert rejected == {
        "malformed: not a JSON object": 2,
        "no assistant turn": 1,
        "malformed: a turn without a known role and text content": 1,
    }
    assert sum(rejected.values()) + len(conversations) == len(read_records(path))


def test_an_unreadable_json_list_is_one_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x"')
    with pytest.raises(LmforgeError, match="not a valid JSON list"):
        load_conversations(path, "alpaca")
