"""PPO end to end on a CPU in minutes: a small chat policy trained from scratch on hh-rlhf harmless transcripts, a
reward model (ScoreModel on the policy's backbone, Bradley-Terry on the same file's chosen/rejected pairs, or on
chosen-vs-scrambled replies), then `lmforge align method=ppo`, whose report plots the reward and KL.

Run: `nice -n 10 python benchmarks/ppo_experiment.py --out runs/ppo_exp [--preference hh|scrambled] [key=value ...]`
(extra key=value pairs go to `lmforge align`, e.g. ppo.adaptive_kl=true ppo.kl_target=6 ppo.kl_horizon=100).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from lmforge.align.losses import bradley_terry_loss
from lmforge.align.reward_model import ScoreModel
from lmforge.checkpoint import load_run, save_checkpoint
from lmforge.cli import main
from lmforge.finetune.formats import from_hh_rlhf, read_records
from lmforge.models import ModelConfig, build_model
from lmforge.tokenizer import Tokenizer

DATA = "/work/shared/data/preference/hh_rlhf_harmless_base_test_dev.jsonl.gz"
CTX = 192


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def train_policy(out: Path, records, steps: int) -> Path:
    texts = [r["chosen"] for r in records]
    tok = Tokenizer.train(texts, vocab_size=2048)
    convs = [from_hh_rlhf(r) for r in records]
    rows = [tok.encode_chat(c, bos=True)[:CTX] for c in convs]
    cfg = ModelConfig(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=CTX)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    for step in range(steps):
        batch = rng.sample(rows, 16)
        ids, lengths = padded(batch, tok.pad_id)
        y = ids[:, 1:].clone()
        y[torch.arange(ids.shape[1] - 1)[None] >= (lengths[:, None] - 1)] = -100
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        loss = model(ids[:, :-1], y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"policy step {step} loss {loss.item():.3f}", flush=True)
    run = out / "policy"
    tok.save(run)
    save_checkpoint(run, steps, model, state={"source": "benchmarks/ppo_experiment.py"})
    return run


def pair_rows(tok, record, preference: str, rng: random.Random) -> tuple[list[int], list[int]]:
    chosen = tok.encode_chat(from_hh_rlhf(record), bos=True)[:CTX]
    if preference == "hh":
        rejected = tok.encode_chat(from_hh_rlhf({"chosen": record["rejected"]}), bos=True)[:CTX]
    else:  # the same conversation with the last reply's words shuffled
        turns = from_hh_rlhf(record)
        words = turns[-1]["content"].split()
        rng.shuffle(words)
        rejected = tok.encode_chat([*turns[:-1], {"role": "assistant", "content": " ".join(words)}], bos=True)[:CTX]
    return chosen, rejected


def train_reward(out: Path, policy: Path, train, val, preference: str, steps: int) -> tuple[Path, float]:
    backbone, tok = load_run(policy)
    rm = ScoreModel(backbone)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    rng = random.Random(1)
    pairs = [pair_rows(tok, r, preference, rng) for r in train]
    pairs = [(c, r) for c, r in pairs if c != r]
    for step in range(steps):
        batch = rng.sample(pairs, 16)
        c, cl = padded([b[0] for b in batch], tok.pad_id)
        r, rl = padded([b[1] for b in batch], tok.pad_id)
        loss = bradley_terry_loss(rm.scores(c, cl), rm.scores(r, rl))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"reward step {step} loss {loss.item():.3f}", flush=True)
    held = [p for p in (pair_rows(tok, r, preference, rng) for r in val) if p[0] != p[1]]
    right = 0
    with torch.no_grad():
        for i in range(0, len(held), 32):
            c, cl = padded([b[0] for b in held[i : i + 32]], tok.pad_id)
            r, rl = padded([b[1] for b in held[i : i + 32]], tok.pad_id)
            right += int((rm.scores(c, cl) > rm.scores(r, rl)).sum())
    run = out / "rm"
    tok.save(run)
    rm.save(run, steps, {"stage": "align", "method": "rm", "preference": preference})
    return run, right / len(held)


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ppo_exp")
    ap.add_argument("--preference", choices=["hh", "scrambled"], default="scrambled")
    ap.add_argument("--policy-steps", type=int, default=300)
    ap.add_argument("--reward-steps", type=int, default=200)
    ap.add_argument("--ppo-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    records = [r for r in read_records(DATA) if isinstance(r, dict)]
    random.Random(0).shuffle(records)
    n_val = len(records) // 10
    val, train = records[:n_val], records[n_val:]
    times = {}
    t = time.perf_counter()
    policy = train_policy(out, train, args.policy_steps)
    times["policy_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reward, accuracy = train_reward(out, policy, train, val, args.preference, args.reward_steps)
    times["reward_s"] = time.perf_counter() - t
    print(f"reward model held-out accuracy {accuracy:.3f} on {args.preference} pairs", flush=True)
    t = time.perf_counter()
    command = [
        "align", "--config", "configs/align/ppo.yaml", f"policy={policy}", f"ppo.reward={reward}",
        f"data.path={DATA}", f"run.root={out}", "run.name=ppo", f"train.steps={args.ppo_steps}",
        "peft.method=full", "train.lr=1e-4", "ppo.epochs=2", "rollout.max_new_tokens=32", "train.eval_every=10",
        "ppo.eval_prompts=64",
        *overrides,
    ]  # fmt: skip
    print("lmforge " + " ".join(command), flush=True)
    main(command)
    times["ppo_s"] = time.perf_counter() - t
    summary = {"reward_model_accuracy": accuracy, "preference": args.preference, **times}
    (out / "experiment.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main_()
