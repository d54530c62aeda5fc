"""The four prompt-learning strategies: what each trains (and leaves alone), label-word scores against a plain forward
pass, and that training moves the classifier."""

import json

import pytest
import torch

from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.finetune import prompt_learning as pl

GOOD = ["wonderful", "lovely", "superb", "delightful", "charming", "brilliant"]
BAD = ["awful", "dreadful", "boring", "dull", "clumsy", "tedious"]


def sentiment(n: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        label = i % 2
        word = (GOOD if label else BAD)[(i // 2) % 6]
        out.append((f"the film number {i} was {word} from start to end.", label))
    return out


def test_label_scores_equal_a_plain_forward_pass(tiny_run):
    model, tokenizer = load_run(tiny_run)
    tuned = pl.prepare(model, "tuning_free", virtual_tokens=4)
    verbalizer = pl.Verbalizer()
    texts = ["a fine day.", "the worst plot ever made, really."]
    scores = pl.label_scores(tuned, *pl.encode(tokenizer, verbalizer, texts), K=2)
    for i, text in enumerate(texts):
        for k, word in enumerate(verbalizer.words):
            prompt = tokenizer.encode(verbalizer.template.format(text=text), bos=True)
            ids = prompt + tokenizer.encode_plain(word)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
            want = sum(logp[j - 1, ids[j]].item() for j in range(len(prompt), len(ids)))
            assert scores[i, k].item() == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("strategy", list(pl.STRATEGIES))
def test_each_strategy_trains_what_it_names(tiny_run, strategy):
    model, tokenizer = load_run(tiny_run)
    torch.manual_seed(0)
    tuned = pl.prepare(model, strategy, virtual_tokens=4)
    lm_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra_before = {n: p.detach().clone() for n, p in tuned.named_parameters() if not n.startswith("model.")}
    data = sentiment(32)
    losses = pl.train(
        tuned, tokenizer, pl.Verbalizer(), data, steps=12, batch=8, lr={"lm": 3e-3, "prompt": 3e-2}, seed=0
    )
    lm_moved = any(not torch.equal(p, lm_before[n]) for n, p in model.named_parameters())
    prompt_moved = any(not torch.equal(p, extra_before[n]) for n, p in tuned.named_parameters() if n in extra_before)
    method, lm_trains = pl.STRATEGIES[strategy]
    assert lm_moved == lm_trains
    assert prompt_moved == (method == "prompt")
    assert bool(extra_before) == (method == "prompt")
    if strategy == "tuning_free":
        assert losses == []
    else:
        assert sum(losses[-3:]) < sum(losses[:3])  # the verbalizer's cross-entropy goes down


def test_compare_writes_every_strategy(tiny_run, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in sentiment(24)))
    result = pl.main([str(tiny_run), "--data", str(data), "--steps", "6", "--limit", "24", "--lm-lr", "3e-3"])
    rows = {r["strategy"]: r for r in result["strategies"]}
    assert list(rows) == list(pl.STRATEGIES)
    assert rows["tuning_free"]["accuracy_before"] == rows["tuning_free"]["accuracy_after"]
    assert rows["fixed_prompt_lm_tuning"]["trainable_share"] == 1.0
    assert 0 < rows["fixed_lm_prompt_tuning"]["trainable_share"] < 0.01
    saved = json.loads((tiny_run / "prompt_learning.json").read_text())
    (tiny_run / "prompt_learning.json").unlink()  # the session's shared run stays as it was
    assert saved["strategies"] == result["strategies"]


def test_bad_data_is_one_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "positive"}) + "\n")
    with pytest.raises(LmforgeError, match="integer class index"):
        pl.read_examples(bad)
    with pytest.raises(LmforgeError, match="does not exist"):
        pl.read_examples(tmp_path / "missing.tsv")
