"""Reply encoding, padded batches and reply log-probabilities against a plain per-sequence forward pass; rollouts
through the engine against its own greedy decode and the live weights."""

from __future__ import annotations

import torch

from lmforge.align.rollouts import sample_groups
from lmforge.align.sequences import encode_reply, make_batch, reply_logprobs
from lmforge.checkpoint import load_run


def test_encode_reply_is_the_suffix_of_the_conversation(tiny_tokenizer):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt_ids, reply_ids = encode_reply(tiny_tokenizer, prompt, "5")
    full = tiny_tokenizer.encode_chat([*prompt, {"role": "assistant", "content": "5"}], bos=True)
    assert prompt_ids + reply_ids == full
    assert reply_ids[-1] == tiny_tokenizer.end_of_turn_id or tiny_tokenizer.end_of_turn_id in reply_ids


def test_reply_logprobs_equal_each_sequence_alone(tiny_run):
    model, tok = load_run(tiny_run)
    prompts = [tok.encode("def f(x):", bos=True), tok.encode("The quick brown", bos=True)]
    replies = [tok.encode(" return x"), tok.encode(" fox jumps over the lazy dog")]
    batch = make_batch(prompts, replies, tok.pad_id)
    got = reply_logprobs(model, batch).sum(-1)
    for i, (p, r) in enumerate(zip(prompts, replies, strict=True)):
        ids = torch.tensor([p + r])
        logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
        want = sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(r))
        assert abs(got[i].item() - want) < 1e-4
    assert batch.lengths.tolist() == [len(r) for r in replies]


def test_rollouts_follow_the_current_weights(tiny_run):
    model, tok = load_run(tiny_run)
    prompts = [tok.encode("import", bos=True), tok.encode("class", bos=True)]
    greedy = sample_groups(model, tok, prompts, 2, 8, temperature=0.0)
    assert [len(g) for g in greedy] == [2, 2]
    assert greedy[0][0].reply == greedy[0][1].reply  # greedy: a group's replies agree
    ids = torch.tensor([prompts[0]])
    want = []
    with torch.no_grad():
        for _ in range(len(greedy[0][0].reply)):
            nxt = int(model(ids)[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    stops = {tok.eos_id, tok.end_of_turn_id}
    got = greedy[0][0].reply
    assert got == want[: len(got)] and (len(got) == 8 or got[-1] in stops)
    with torch.no_grad():  # change the weights in place: the next rollout must see it
        model.lm_head.weight.mul_(-1.0)
    flipped = sample_groups(model, tok, prompts, 1, 8, temperature=0.0)
    assert flipped[0][0].reply != greedy[0][0].reply
    sampled = sample_groups(model, tok, prompts, 3, 8, temperature=1.0, seed=5)
    again = sample_groups(model, tok, prompts, 3, 8, temperature=1.0, seed=5)
    assert [[r.reply for r in g] for g in sampled] == [[r.reply for r in g] for g in again]
