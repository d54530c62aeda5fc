"""PPO through `lmforge align method=ppo` on a tiny policy, against a reward model trained here (Bradley-Terry, a few
dozen steps) to prefer replies made of a set of "good" tokens: the reward rises while the KL stays bounded, a resumed
run ends where an uninterrupted one does, and bad inputs exit 2."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.align.config import AlignConfig, AlignDataConfig, PpoConfig
from lmforge.align.experience import Models, make_experience, rollout_batch
from lmforge.align.losses import bradley_terry_loss
from lmforge.align.prompts import load_prompts
from lmforge.align.reward_model import ScoreModel, load_score_model
from lmforge.align.rollouts import sample_groups
from lmforge.checkpoint import latest_checkpoint, load_run
from lmforge.cli import main
from lmforge.finetune.methods import PeftConfig, tune
from lmforge.tokenizer import Tokenizer

CONFIG = Path(__file__).parents[2] / "configs/align/ppo.yaml"
GOOD = range(300, 364)  # the reward model learns: the more of a reply's tokens are from here, the better
WORDS = "the a cat dog runs jumps over under big small red blue tree house river stone".split()  # noqa: SIM905


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: a second intra-op thread only adds synchronisation, which stalls badly on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reply(rng: random.Random, share: float, end: int) -> list[int]:
    bad = [t for t in range(3, 512) if t not in GOOD]
    return [rng.choice(GOOD) if rng.random() < share else rng.choice(bad) for _ in range(8)] + [end]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_run):
    """A reward-model run on the tiny policy's backbone and tokenizer, trained for 80 Bradley-Terry steps on pairs
    whose chosen reply holds the larger share of GOOD tokens."""
    torch.manual_seed(0)
    backbone, tok = load_run(tiny_run)
    rm = ScoreModel(backbone)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    rng = random.Random(0)
    prompt = tok.encode_chat([{"role": "user", "content": "say something"}], add_generation_prompt=True, bos=True)
    for _ in range(80):
        chosen, rejected = [], []
        for _ in range(16):
            lo, hi = sorted(rng.random() for _ in range(2))
            chosen.append(prompt + _reply(rng, hi, tok.end_of_turn_id))
            rejected.append(prompt + _reply(rng, lo, tok.end_of_turn_id))
        lengths = torch.full((16,), len(chosen[0]))
        loss = bradley_terry_loss(rm.scores(torch.tensor(chosen), lengths), rm.scores(torch.tensor(rejected), lengths))
        opt.zero_grad()
        loss.backward()
        opt.step()
    run = tmp_path_factory.mktemp("rm")
    tok.save(run)
    rm.save(run, 80, {"stage": "align", "method": "rm"})
    return run


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))} for _ in range(60)]
    lines += [{"chosen": "\n\nHuman: hello there\n\nAssistant: hi\n\nHuman: tell me a story\n\nAssistant: no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n")
    return path


def align(tmp_path, tiny_run, reward_run, prompts, name, *overrides, resume=False):
    base = [
        "method=ppo", f"policy={tiny_run}", f"ppo.reward={reward_run}", f"data.path={prompts}", "data.format=prompts",
        f"run.root={tmp_path}", f"run.name={name}", "rollout.prompts_per_step=8", "rollout.group_size=2",
        "rollout.max_new_tokens=8", "train.batch_size=8", "train.schedule=constant", "train.warmup_steps=0",
        "train.log_every=1", "train.samples=2", "ppo.eval_prompts=6", "ppo.minibatches=2", "ppo.epochs=2",
    ]  # fmt: skip
    main(["align", "--config", str(CONFIG), *base, *overrides, *(["--resume"] if resume else [])])
    run = tmp_path / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, [r for r in rows if "reward" in r]


def test_prompts_reader_takes_prompts_and_hh_transcripts(prompts, tiny_tokenizer):
    train, val, rejected = load_prompts(AlignDataConfig(path=str(prompts), format="prompts"), tiny_tokenizer, 64)
    assert rejected == {"malformed: not a JSON object": 1} and len(val) >= 1
    hh = tiny_tokenizer.encode_chat(
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
         {"role": "user", "content": "tell me a story"}], add_generation_prompt=True, bos=True,
    )  # fmt: skip
    assert hh in train + val  # the transcript's turns before its last reply
    assert all(p[-1] == tiny_tokenizer.encode_chat([], add_generation_prompt=True)[-1] for p in train)


def test_returns_sum_the_score_and_the_kl_penalty(tiny_run, reward_run):
    model, tok = load_run(tiny_run)
    reference, _ = load_run(tiny_run)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a policy apart from its reference
    reward, _ = load_score_model(reward_run)
    models = Models(tune(model, PeftConfig()), copy.deepcopy(reward), reference, reward)
    cfg = AlignConfig(ppo=PpoConfig(gamma=1.0, lam=1.0, whiten_advantages=False))
    chats = [[{"role": "user", "content": text}] for text in ("cat", "big red tree")]
    prompts = [tok.encode_chat(c, add_generation_prompt=True, bos=True) for c in chats]
    groups = sample_groups(model, tok, prompts, 2, 8, seed=3)
    batch, finished = rollout_batch(prompts, groups, tok.pad_id)
    exp = make_experience(models, batch, finished, 0.2, cfg)
    # with gamma = lambda = 1 the return at the first reply token is the sum of the rewards that follow
    first = batch.mask.float().argmax(-1)
    kl = ((exp.logps - exp.ref_logps) * batch.mask).sum(-1)
    torch.testing.assert_close(exp.returns[torch.arange(4), first], exp.scores - 0.2 * kl)
    for i, r in enumerate(r for g in groups for r in g):  # the score: each whole sequence alone, at its last token
        with torch.no_grad():
            alone = reward.values(torch.tensor([r.prompt + r.reply]))[0, -1]
        torch.testing.assert_close(exp.scores[i], alone, rtol=1e-4, atol=1e-5)
        ref = torch.log_softmax(reference(torch.tensor([r.prompt + r.reply[:-1]]))[0, len(r.prompt) - 1 :], -1)
        want = ref.gather(-1, torch.tensor(r.reply)[:, None]).sum()
        torch.testing.assert_close(exp.ref_logps[i].sum(), want, rtol=1e-4, atol=1e-4)


def test_ppo_through_the_cli_writes_summary_metrics_and_report(tmp_path, tiny_run, reward_run, prompts):
    run, rows = align(tmp_path, tiny_run, reward_run, prompts, "lora", "train.steps=2",
                      "ppo.value_init=policy", "ppo.missing_eos_penalty=1.0")  # fmt: skip
    summary = json.loads((run / "align.json").read_text())
    assert summary["training"]["steps"] == 2 and len(summary["samples"]) == 2
    assert {"reward_before", "reward_after", "kl_after"} <= summary["training"].keys()
    assert [r["step"] for r in rows] == [1, 2]
    keys = {"reward", "kl", "non_score_reward", "kl_coef", "policy_loss", "value_loss", "clip_fraction", "approx_kl"}
    assert keys <= rows[0].keys() and rows[0]["clip_fraction"] == 0.0  # the first minibatch's ratio is exactly 1
    report = (run / "report.md").read_text()
    assert "## align" in report and "align_loss_curve.png" in report
    assert (run / "adapter").is_dir() and json.loads((run / "align_config.json").read_text())["method"] == "ppo"
    model, _ = load_run(run)  # the merged policy reads as a plain run
    assert model.cfg.vocab_size == 512


def test_reward_rises_while_kl_stays_bounded(tmp_path, tiny_run, reward_run, prompts):
    kl_coef = 0.1
    run, rows = align(tmp_path, tiny_run, reward_run, prompts, "rise", "train.steps=24", "train.lr=3e-3",
                      "peft.method=full", f"ppo.kl_coef={kl_coef}", "ppo.epochs=4")  # fmt: skip
    first = sum(r["reward"] for r in rows[:4]) / 4
    final = sum(r["reward"] for r in rows[-4:]) / 4
    summary = json.loads((run / "align.json").read_text())["training"]
    assert final > first + 1.0, (first, final)
    assert summary["reward_after"] > summary["reward_before"] + 1.0
    # With a fixed coefficient beta, any policy whose objective E[r] - beta KL beats the reference's has
    # beta KL <= E[r] - E_ref[r]: PPO climbs that objective, so the KL stays within the reward gained over beta.
    gained = max(r["reward"] for r in rows) - first
    assert all(r["kl"] <= gained / kl_coef + 5.0 for r in rows), [r["kl"] for r in rows]


def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, tiny_run, reward_run, prompts):
    common = ["train.lr=1e-3", "train.ckpt_every=2", "peft.method=lora", "ppo.adaptive_kl=true", "ppo.kl_horizon=50"]
    whole, _ = align(tmp_path, tiny_run, reward_run, prompts, "whole", "train.steps=4", *common)
    align(tmp_path, tiny_run, reward_run, prompts, "cut", "train.steps=2", *common)
    cut, rows = align(tmp_path, tiny_run, reward_run, prompts, "cut", "train.steps=4", *common, resume=True)
    want, got = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in (whole, cut))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    state = [torch.load(latest_checkpoint(r) / "finetune_state.pt", weights_only=True) for r in (whole, cut)]
    assert state[0]["kl"] == state[1]["kl"] and state[0]["kl"]["coef"] != 0.05  # the controller moved, alike
    assert all(torch.equal(state[0]["value"][k], state[1]["value"][k]) for k in state[0]["value"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_bad_inputs_exit_2_with_one_line(tmp_path, tiny_run, tiny_text, reward_run, prompts, capsys):
    other = tmp_path / "other_rm"
    Tokenizer.train([tiny_text[i : i + 2000] for i in range(0, 40_000, 2000)], vocab_size=512).save(other)
    model, _ = load_run(tiny_run)
    ScoreModel(model).save(other, 0, {})
    assert load_score_model(other)[0].head.weight.shape == (1, 64)
    cases = [
        ([], "method=ppo needs a reward model; give ppo.reward=RUN"),
        ([f"ppo.reward={other}"], "reads another tokenizer"),
        ([f"ppo.reward={tiny_run}"], "has no score_head.safetensors"),
        ([f"ppo.reward={reward_run}", "peft.method=adapter"], "cannot be merged"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["align", "method=ppo", f"policy={tiny_run}", f"data.path={prompts}", "data.format=prompts",
                  f"run.root={tmp_path}", "run.name=bad", *args])  # fmt: skip
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
