"""A fine-tuned tiny model's GGUF export ends its answers at the end-of-turn token in llama.cpp: a 2-layer model
fine-tuned until it memorises five short answers, exported by `lmforge export gguf`'s writer, then asked each trained
question greedily in llama.cpp (llama-cpp-python) on the same token ids; every answer must equal lmforge's, and stop
by itself (finish_reason "stop", no stop strings given) wherever lmforge's stops (the four trained questions at least;
one of the five is held out).

    .venv/bin/python benchmarks/check_llamacpp_eot.py       # ~20 s; exit 0 when every answer stops, 1 when not

Needs llama-cpp-python (`pip install llama-cpp-python` builds llama.cpp from source); without it, one line and exit 0.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from lmforge.checkpoint import load_run, save_checkpoint  # noqa: E402
from lmforge.cli import run_stage  # noqa: E402
from lmforge.interop.gguf import export_gguf  # noqa: E402
from lmforge.models import ModelConfig, build_model  # noqa: E402
from lmforge.sampling import generate_tokens  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

QA = [
    ("Name a colour.", "Blue."),
    ("What is two plus two?", "Four."),
    ("Say hello.", "Hello!"),
    ("Which animal barks?", "A dog."),
    ("What do cows drink?", "Water."),
]
MAX_NEW = 16


def finetuned(root: Path) -> Path:
    """A tiny base (BPE of 512 on Python's pydoc topics, 2 layers, dim 64) fine-tuned 60 steps on QA."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:200_000]
    tok = Tokenizer.train([text[i : i + 2000] for i in range(0, len(text), 2000)], vocab_size=512)
    base = root / "base"
    tok.save(base)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=128)
    save_checkpoint(base, 0, build_model(cfg, seed=0), state={})
    data = root / "qa.json"
    data.write_text(json.dumps([{"prompt": q, "completion": a} for q, a in QA]))
    overrides = [f"base={base}", f"data.path={data}", "data.format=prompt_completion", "data.val_fraction=0.2",
                 "train.steps=60", "train.lr=5e-3", "train.schedule=constant", "train.warmup_steps=0",
                 "train.log_every=60", "train.samples=0", "train.device=cpu", f"run.root={root}",
                 "run.name=qa"]  # fmt: skip
    run_stage("finetune", None, overrides)
    return root / "qa"


def main() -> int:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama_cpp is not importable; pip install llama-cpp-python to run this check")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        run = finetuned(Path(tmp))
        gguf = export_gguf(run, Path(tmp) / "qa.gguf")
        model, tok = load_run(run)
        llm = Llama(model_path=str(gguf), n_ctx=128, verbose=False, logits_all=False)
        failures, stopped = 0, 0
        for question, answer in QA:
            ids = tok.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True, bos=True)
            ours = list(generate_tokens(model, ids, MAX_NEW, stop_ids={tok.end_of_turn_id}))
            out = llm.create_completion(prompt=ids, max_tokens=MAX_NEW, temperature=0.0)["choices"][0]
            ended = len(ours) < MAX_NEW  # generate_tokens stops before the end-of-turn token
            ok = out["text"] == tok.decode(ours) and (out["finish_reason"] == "stop") == ended
            failures, stopped = failures + (not ok), stopped + (ok and ended)
            print(f"{'ok  ' if ok else 'FAIL'} {question!r}: lmforge {tok.decode(ours)!r} (reference {answer!r}), "
                  f"llama.cpp {out['text']!r} finish_reason {out['finish_reason']}")  # fmt: skip
    print(f"{stopped}/{len(QA)} answers stop at the end-of-turn token in llama.cpp, {failures} differ from lmforge's")
    return 1 if failures or stopped < len(QA) - 1 else 0


if __name__ == "__main__":
    sys.exit(main())
