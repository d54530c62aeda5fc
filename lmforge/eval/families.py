"""The ways a task is scored: perplexity (windows over a text), multiple choice (log-likelihood of each ending,
acc and lm-eval's character-length-normalised acc_norm), generation (a completion scored against a reference), code
(completions run against tests, eval/code.py), and the safety probes scored by each sentence's log-likelihood: bias
(counterfactual sentences, per group) and canary (exposure of planted canaries; eval/safety.py).

Each family turns a batch of items into sample records ({"i": index, ...}; a record with "skipped" names why the item
was not scored), and `aggregate` turns all records into metrics: per-item scores averaged (with their standard
error), corpus metrics (BLEU, ROUGE, refusal rate) computed over every completion at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jinja2

from lmforge.eval import answers
from lmforge.eval.backends import bits_per_byte
from lmforge.eval.tasks import Task, few_shot_prefix

Sample = dict[str, Any]


class Skip(str):
    """Why an item was not scored."""


def _attempt(render: Callable[[], Any]) -> Any:
    """render(), or the Skip reason when the item lacks a field the templates read or holds a wrong type."""
    try:
        return render()
    except jinja2.UndefinedError as e:
        return Skip(f"missing field ({e.message})")
    except (TypeError, ValueError, IndexError, KeyError) as e:
        return Skip(f"bad item ({type(e).__name__})")


def perplexity(task: Task, backend, batch: list[tuple[int, dict]], pool: list[dict], shots: int) -> list[Sample]:
    out = []
    for i, item in batch:
        text = _attempt(lambda item=item: task.render(task.prompt, item))
        if isinstance(text, Skip) or not text:
            out.append({"i": i, "skipped": text or "empty text"})
            continue
        nll, tokens = backend.rolling_nll(text, task.stride)
        out.append({"i": i, "nll": nll, "tokens": tokens, "bytes": len(text.encode())})
    return out


def multiple_choice(task: Task, backend, batch: list[tuple[int, dict]], pool: list[dict], shots: int) -> list[Sample]:
    requests, kept, out = [], [], []
    for i, item in batch:

        def render(i=i, item=item):
            choices, gold = task.value(task.choices, item), task.value(task.answer, item)
            context = few_shot_prefix(task, pool, i, shots) + task.render(task.prompt, item)
            return context, [str(c) for c in choices], int(gold)

        got = _attempt(render)
        if isinstance(got, Skip):
            out.append({"i": i, "skipped": str(got)})
        elif not 0 <= got[2] < len(got[1]):
            out.append({"i": i, "skipped": "answer out of range"})
        else:
            requests.append((got[0], [task.target_delimiter + c for c in got[1]]))
            kept.append((i, got[1], got[2]))
    for (i, choices, gold), scores in zip(kept, backend.loglikelihood(requests), strict=True):
        if isinstance(scores, str):
            out.append({"i": i, "skipped": scores})
            continue
        lls = [lp for lp, _ in scores]
        pred = max(range(len(lls)), key=lls.__getitem__)
        norm = [lp / max(1, len(c)) for lp, c in zip(lls, choices, strict=True)]  # lm-eval: / len(choice) in chars
        pred_norm = max(range(len(norm)), key=norm.__getitem__)
        record = {"i": i, "gold": gold, "pred": pred, "lls": lls, "greedy": [g for _, g in scores]}
        out.append({**record, "scores": {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}})
    return out


def generation(task: Task, backend, batch: list[tuple[int, dict]], pool: list[dict], shots: int) -> list[Sample]:
    prompts, kept, out = [], [], []
    for i, item in batch:

        def render(i=i, item=item):
            prompt = few_shot_prefix(task, pool, i, shots) + task.render(task.prompt, item)
            return prompt, task.value(task.answer, item) if task.answer else ""

        got = _attempt(render)
        if isinstance(got, Skip):
            out.append({"i": i, "skipped": str(got)})
        else:
            prompts.append(got[0])
            kept.append((i, got))
    completions = backend.generate(prompts, task.until, task.max_tokens, 1, task.temperature)
    for (i, (prompt, reference)), got in zip(kept, completions, strict=True):
        if isinstance(got, str):
            out.append({"i": i, "skipped": got})
            continue
        record = {"i": i, "prompt": prompt, "completion": got[0], "reference": reference}
        out.append({**record, "scores": item_scores(task.metrics, got[0], reference)})
    return out


def item_scores(metrics: list[str], completion: str, reference: Any) -> dict[str, float]:
    scores: dict[str, float] = {}
    if {"exact_match_strict", "exact_match_flexible"} & set(metrics):
        scores.update(answers.gsm8k_scores(completion, str(reference)))
    if {"exact_match", "f1"} & set(metrics):
        truths = reference if isinstance(reference, list) else [str(reference)]
        scores.update(answers.squad_scores(completion.strip(), truths))
    return {k: v for k, v in scores.items() if k in metrics}


def _nlg(name: str) -> Callable:
    def metric(samples: list[Sample]) -> float | dict[str, float]:
        from lmforge.eval import nlg  # another module's metrics, imported when a task asks for them

        refs = [s["reference"] if isinstance(s["reference"], str) else s["reference"][0] for s in samples]
        return getattr(nlg, name)([s["completion"] for s in samples], refs)

    return metric


def _refusal_rate(samples: list[Sample]) -> float:
    from lmforge.eval import safety

    return safety.refusal_rate([s["prompt"] for s in samples], [s["completion"] for s in samples])


def _toxicity(samples: list[Sample]) -> float:
    """Share of completions holding a term of the LDNOOBW list."""
    from lmforge.eval import safety

    return safety.toxicity([s["completion"] for s in samples], words=safety.LDNOOBW)["word_hit_rate"]


# metrics computed over all completions at once; rouge gives rouge1, rouge2 and rougeL together
CORPUS_METRICS: dict[str, Callable[[list[Sample]], Any]] = {
    "bleu": _nlg("bleu"),
    "chrf": _nlg("chrf"),
    "rouge": _nlg("rouge"),
    "bertscore_f1": _nlg("bertscore_f1"),
    "refusal_rate": _refusal_rate,
    "toxicity": _toxicity,
}


def aggregate(task: Task, samples: list[Sample]) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, their standard errors) over the scored samples."""
    scored = [s for s in samples if "skipped" not in s]
    if not scored:
        return {}, {}
    if task.family == "perplexity":
        nll, tokens, n_bytes = (sum(s[k] for s in scored) for k in ("nll", "tokens", "bytes"))
        return {"ppl": math.exp(nll / tokens), "bits_per_byte": bits_per_byte(nll, n_bytes)}, {}
    if task.family in PROBE_METRICS:
        return PROBE_METRICS[task.family](scored), {}
    metrics, stderr = {}, {}
    for name in dict.fromkeys(k for s in scored for k in s.get("scores", {})):
        values = [s["scores"][name] for s in scored if name in s.get("scores", {})]
        mean = sum(values) / len(values)
        metrics[name] = mean
        if len(values) > 1:  # lm-eval's mean_stderr: sample standard deviation / sqrt(n)
            stderr[name] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    for corpus in dict.fromkeys("rouge" if m.startswith("rouge") else m for m in task.metrics):
        if corpus in CORPUS_METRICS:
            value = CORPUS_METRICS[corpus](scored)
            metrics.update(value if isinstance(value, dict) else {corpus: value})
    return {k: v for k, v in metrics.items() if k in task.metrics or task.family == "code"}, stderr


def code(task: Task, backend, batch: list[tuple[int, dict]], pool: list[dict], shots: int) -> list[Sample]:
    """Each problem on its own (so an interrupted run resumes per problem): the mean of per-problem pass@k
    estimates is pass@k over the problems (Chen et al., 2021)."""
    from lmforge.eval import code as code_eval  # another module: completions run in its sandbox

    n = task.samples_per_problem
    ks = [k for k in (1, 10, 100) if k <= n]
    out = []
    for i, item in batch:
        errors: list[str] = []

        def generate_fn(prompt: str, count: int, i: int = i, errors: list[str] = errors) -> list[str]:
            got = backend.generate([prompt], task.until, task.max_tokens, count, task.temperature, seed=i)[0]
            if isinstance(got, str):
                errors.append(got)
                return [""] * count
            return got

        metrics, samples = code_eval.run_problems([item], generate_fn, n, ks)
        out.append({"i": i, "skipped": errors[0]} if errors else {"i": i, "samples": samples, "scores": metrics})
    return out


def likelihood(task: Task, backend, batch: list[tuple[int, dict]], pool: list[dict], shots: int) -> list[Sample]:
    """The log-likelihood of each item's whole "text" (after the model's BOS), the item's other fields kept."""
    results = backend.loglikelihood([("", [item["text"]]) for _, item in batch])
    out = []
    for (i, item), scores in zip(batch, results, strict=True):
        out.append({"i": i, "skipped": scores} if isinstance(scores, str) else {"i": i, **item, "ll": scores[0][0]})
    return out


def _bias(samples: list[Sample]) -> dict[str, float]:
    """Per probe, "loglik/<probe>/<group>": the group's mean log-likelihood, and "gap/<probe>" (safety.bias_gap)."""
    from lmforge.eval import safety

    metrics = {}
    for probe in dict.fromkeys(s["probe"] for s in samples):
        rows = [s for s in samples if s["probe"] == probe]
        ll = {s["text"]: s["ll"] for s in rows}
        pairs = [safety.BiasItem(s["template"], s["group"], s["word"], s["text"]) for s in rows]
        if len({p.group for p in pairs}) < 2:
            continue  # --limit cut the probe to one group: no gap to measure
        gap = safety.bias_gap(lambda texts, ll=ll: [ll[t] for t in texts], pairs)
        metrics.update({f"loglik/{probe}/{g}": v for g, v in gap.items() if g != "gap"})
        metrics[f"gap/{probe}"] = gap["gap"]
    return metrics


def _canary(samples: list[Sample]) -> dict[str, float]:
    """Mean exposure (bits) of the planted canaries and of the controls, each ranked among the candidates."""
    from lmforge.eval import safety

    ll = {s["text"]: s["ll"] for s in samples}
    candidates = [s["text"] for s in samples if s["role"] == "candidate"]
    metrics = {}
    for role in ("planted", "control"):
        texts = [s["text"] for s in samples if s["role"] == role]
        if texts and candidates:
            bits = [safety.exposure(lambda ts: [ll[t] for t in ts], t, candidates) for t in texts]
            metrics[f"exposure_{role}"] = sum(bits) / len(bits)
    return metrics


PROBE_METRICS: dict[str, Callable[[list[Sample]], dict[str, float]]] = {"bias": _bias, "canary": _canary}
FAMILIES = {
    "perplexity": perplexity,
    "multiple_choice": multiple_choice,
    "generate": generation,
    "code": code,
    "bias": likelihood,
    "canary": likelihood,
}
