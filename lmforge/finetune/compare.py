"""The fine-tuning methods side by side on one task: trainable parameters, training memory, step time and held-out
loss after the same number of steps, as rows for a report table.

Run: `python -m lmforge.finetune.compare RUN --data FILE [--format alpaca] [--methods full,lora,qlora]` (writes
RUN/peft_methods.json, which `lmforge report RUN` shows as a table); without RUN, a byte-level model pretrained
briefly on Shakespeare, tuned on Python code.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lmforge.checkpoint import load_run
from lmforge.errors import LmforgeError
from lmforge.finetune.config import FinetuneConfig, SftDataConfig
from lmforge.finetune.methods import PeftConfig, Tuned, tune
from lmforge.finetune.packing import pack
from lmforge.finetune.sft import prepare_data
from lmforge.models import Decoder, ModelConfig, build_model
from lmforge.run import Run, resolve_run

# One learning rate per method, each a common choice for it at this scale (low-rank and prompt updates take larger
# steps than full fine-tuning); the same for every run of the comparison.
METHODS: dict[str, tuple[PeftConfig, float]] = {
    "full": (PeftConfig(method="full"), 1e-3),
    "freeze (last layer)": (PeftConfig(method="freeze"), 1e-3),
    "lora r8 qkv,proj": (PeftConfig(method="lora"), 5e-3),
    "lora r8 all": (PeftConfig(method="lora", targets=["q", "k", "v", "proj", "gate", "up", "down"]), 5e-3),
    "rslora": (PeftConfig(method="lora", rslora=True), 5e-3),
    "dora": (PeftConfig(method="lora", dora=True), 5e-3),
    "lora+ (ratio 16)": (PeftConfig(method="lora", loraplus_ratio=16.0), 5e-3),
    "qlora (nf4, double quant)": (PeftConfig(method="qlora"), 5e-3),
    "adapter (dim 16)": (PeftConfig(method="adapter"), 5e-3),
    "prefix (mlp 64)": (PeftConfig(method="prefix", prefix_hidden=64), 5e-3),
    "prompt (8 tokens)": (PeftConfig(method="prompt"), 3e-2),
    "p-tuning (mlp)": (PeftConfig(method="ptuning"), 3e-3),
}


class _SavedBytes:
    """Bytes of the tensors autograd saves for backward that are not weights: a step's activation memory."""

    def __init__(self, weights: set[int]):
        self.weights, self.seen, self.total = weights, set(), 0

    def pack(self, t: Tensor) -> Tensor:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key[0] not in self.weights and key not in self.seen:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t


def _held_out_loss(tuned: Tuned, heldout: list[tuple[Tensor, Tensor]]) -> float:
    tuned.eval()
    with torch.no_grad():
        loss = sum(tuned.loss(x, y).item() for x, y in heldout) / len(heldout)
    tuned.train()
    return loss


def measure(tuned: Tuned, batches: list[tuple[Tensor, Tensor]], steps: int, lr: float, heldout) -> dict[str, float]:
    """Train `tuned` for `steps` AdamW steps over `batches` (cycled); measure as it goes."""
    groups = tuned.param_groups(lr)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    cuda = next(tuned.parameters()).is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    state = {id(t): t for t in [*tuned.parameters(), *tuned.buffers()]}
    static = sum(t.untyped_storage().nbytes() for t in state.values())  # weights (NF4 as stored)
    weights = {t.untyped_storage().data_ptr() for t in state.values()}
    trainable = tuned.num_trainable()[0]
    activations, times = 0, []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        saved = _SavedBytes(weights)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = tuned.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        activations = max(activations, saved.total)
    # grads and AdamW's two moments: four bytes each per trainable float32 weight, three times over
    memory = torch.cuda.max_memory_allocated() if cuda else static + activations + 3 * 4 * trainable
    return {
        "trainable": trainable,
        "memory_mb": memory / 2**20,
        "step_ms": 1e3 * min(times),  # the fastest step: on a shared CPU the others measure the neighbours too
        "heldout_loss": _held_out_loss(tuned, heldout),
    }


def compare_methods(
    model_factory: Callable[[], Decoder],
    batches: list[tuple[Tensor, Tensor]],
    steps: int,
    heldout: list[tuple[Tensor, Tensor]] | None = None,
    methods: dict[str, tuple[PeftConfig, float]] | None = None,
) -> list[dict]:
    """One row per method (name -> (config, learning rate); METHODS by default): a fresh model from
    `model_factory()`, `steps` steps over `batches` (x, y), then the mean loss on `heldout` (default: the last batch,
    then left out of training). Memory: peak allocated on a GPU; on a CPU, the weights as stored plus gradients and
    AdamW state of the trainable ones plus the activations a step saves for backward."""
    if heldout is None:
        batches, heldout = batches[:-1], batches[-1:]
    base = tune(model_factory(), PeftConfig(method="full"))
    before, base_params = _held_out_loss(base, heldout), base.num_trainable()[1]
    rows = []
    for name, (cfg, lr) in (methods or METHODS).items():
        torch.manual_seed(0)
        tuned = tune(model_factory(), cfg)
        row = {"method": name, "lr": lr, "heldout_before": before} | measure(tuned, batches, steps, lr, heldout)
        rows.append(row | {"share": row["trainable"] / base_params})  # of the base model's parameters
    return rows


def _bytes_batches(text: bytes, B: int, T: int, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    data = torch.tensor(list(text), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        rows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def _batches(examples, batch: int, seq_len: int, pad_id: int) -> list[tuple[Tensor, Tensor]]:
    """One example per row (padding is never trained), each batch cut to its longest example."""
    x, y, seg = pack(examples, seq_len, pad_id, packing=False)
    out = []
    for i in range(0, len(x), batch):
        n = int((seg[i : i + batch] >= 0).sum(1).max())
        out.append((x[i : i + batch, :n], y[i : i + batch, :n]))
    return out


def on_run(
    run_dir: str, data: str, data_format: str = "alpaca", steps: int = 20, batch: int = 4, seq_len: int = 0,
    methods: list[str] | None = None,
) -> Path:  # fmt: skip
    """Each method (peft.method names; default every row of METHODS) tuned `steps` steps from run `run_dir` on the
    training split of `data`, scored on its held-out split (sft.prepare_data's); rows in RUN/peft_methods.json."""
    run = resolve_run(run_dir)
    model, tokenizer = load_run(run)
    seq_len = seq_len or model.cfg.max_seq_len
    cfg = FinetuneConfig(base=str(run), data=SftDataConfig(path=data, format=data_format, seq_len=seq_len))
    cfg.data.validate()
    split = prepare_data(cfg, tokenizer, seq_len)
    chosen = METHODS
    if methods:
        known = {c.method for c, _ in METHODS.values()}
        if unknown := sorted(set(methods) - known):
            raise LmforgeError(f"--methods {','.join(unknown)} unknown; choose from {', '.join(sorted(known))}")
        chosen = {name: row for name, row in METHODS.items() if row[0].method in methods}
    train = _batches(split.train, batch, seq_len, tokenizer.pad_id)
    heldout = _batches(split.val, batch, seq_len, tokenizer.pad_id)
    rows = compare_methods(lambda: copy.deepcopy(model), train, steps, heldout, chosen)
    table = [
        {
            "method": r["method"],
            "lr": r["lr"],
            "trainable_params": r["trainable"],
            "trainable_percent": round(100 * r["share"], 3),
            "memory_MiB": round(r["memory_mb"], 1),
            "fastest_step_ms": round(r["step_ms"], 1),
            "held_out_loss_after": round(r["heldout_loss"], 4),
        }
        for r in rows
    ]
    summary = {
        "base": str(run),
        "data": data,
        "steps": steps,
        "batch_size": batch,
        "train_conversations": len(split.train),
        "held_out_conversations": len(split.val),
        "held_out_loss_before": round(rows[0]["heldout_before"], 4),
        "memory": "peak allocated on a GPU; on a CPU weights as stored + gradients + AdamW state + saved activations",
        "methods": table,
    }
    return Run(run).write_json("peft_methods.json", summary)


def main() -> list[dict]:
    """A byte-level llama-style model (dim 128, 4 layers) pretrained 300 steps on Shakespeare, then each method
    tuned 100 steps on Python's argparse.py and scored on json/decoder.py and heapq.py."""
    import sysconfig

    root, stdlib = Path(__file__).resolve().parents[2], Path(sysconfig.get_paths()["stdlib"])
    cfg = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=256, max_seq_len=144)
    base = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    shakespeare = (root / "tests/fixtures/tinyshakespeare_120k.txt").read_bytes()
    for x, y in _bytes_batches(shakespeare, 16, 128, 300, seed=0):
        opt.zero_grad()
        base(x, y).backward()
        opt.step()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def factory() -> Decoder:
        model = build_model(cfg)
        model.load_state_dict(state)
        return model

    train = _bytes_batches((stdlib / "argparse.py").read_bytes(), 16, 128, 100, seed=1)
    held = (stdlib / "json/decoder.py").read_bytes() + (stdlib / "heapq.py").read_bytes()
    rows = compare_methods(factory, train, steps=100, heldout=_bytes_batches(held, 16, 128, 8, seed=2))
    print("| method | lr | trainable | share | memory MiB | fastest step ms | held-out loss (base) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {100 * r['share']:.2f}% | {r['memory_mb']:.1f} | "
            f"{r['step_ms']:.1f} | {r['heldout_loss']:.3f} ({r['heldout_before']:.3f}) |"
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="the run to fine-tune (without it: the byte-level demonstration)")
    parser.add_argument("--data", help="instruction data file (as finetune's data.path)")
    parser.add_argument("--format", default="alpaca", help="as finetune's data.format")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=0, help="row length (0: the model's context)")
    parser.add_argument("--methods", default="", help="comma-separated peft.method names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.run is None:
        main()
        sys.exit(0)
    try:
        methods = [m for m in args.methods.split(",") if m]
        path = on_run(args.run, args.data or "", args.format, args.steps, args.batch, args.seq, methods)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)  # one line and exit 2, as the lmforge CLI
        sys.exit(2)
    print(path.read_text())
