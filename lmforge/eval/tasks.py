"""Evaluation tasks as YAML files (configs/eval/NAME.yaml): which data, how an item becomes a prompt, its choices or
target, and the metrics; a user adds a task by writing one, with no code.

Templates are Jinja (`"{{question}}"`, as lm-eval's task files); `choices` and `answer` are Jinja expressions over the
item's fields (`"choices.label.index(answerKey)"`). Every field a family needs is checked when the file loads, and
every item when it is read: a missing field or an answer out of range is counted as a skip reason, never a crash.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2
import yaml

from lmforge.config import check, from_dict
from lmforge.errors import LmforgeError

TASK_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
FAMILIES = ("perplexity", "multiple_choice", "generate", "code", "bias", "canary")
METRICS = {  # what each family computes (families.py); code reports pass@k for the k it is asked
    "perplexity": {"ppl", "bits_per_byte"},
    "multiple_choice": {"acc", "acc_norm"},
    "generate": {
        "exact_match_strict",
        "exact_match_flexible",
        "exact_match",
        "f1",
        "bleu",
        "chrf",
        "rouge1",
        "rouge2",
        "rougeL",
        "bertscore_f1",
        "refusal_rate",
        "toxicity",
    },  # fmt: skip
    "bias": {"loglik", "gap"},  # per probe: each group's mean log-likelihood, and the gap between groups
    "canary": {"exposure"},  # of the planted canaries and of the controls
}
_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass
class FewShot:
    k: int = 0
    """Solved examples before each item (`--shots` overrides)."""
    source: str = ""
    """File of the examples (same format as the data); "" takes them from the data itself, never the item scored."""
    separator: str = "\n\n"
    """Between examples, and between the last example and the item."""

    def validate(self) -> None:
        check(self.k >= 0, f"few_shot.k={self.k} must be >= 0")


@dataclass
class Task:
    name: str
    family: Literal["perplexity", "multiple_choice", "generate", "code", "bias", "canary"]
    metrics: list[str]
    """The metrics the family computes for it (see families.METRICS)."""
    data: str = ""
    """Default data file, relative to the working directory (`--data` overrides)."""
    format: Literal["jsonl", "csv", "text", "parallel", "bias_probes", "canaries"] = "jsonl"
    """jsonl: one item a line; csv: one item a row (with a header); text: the whole file is one item {"text": ...};
    parallel: line n of the data and of `references` is item n {"source": ..., "reference": ...} (WMT's files);
    bias_probes: every sentence of the probes of a bias_templates.json; canaries: a run's canaries.json, the planted
    canaries and controls, then `candidates` more from the same generator."""
    references: str = ""
    """parallel: the file of reference lines, aligned with the data's lines."""
    prompt: str = ""
    """Template of the context (multiple_choice), the prompt (generate, code) or the text (perplexity)."""
    choices: str = ""
    """multiple_choice: expression giving the list of endings."""
    answer: str = ""
    """multiple_choice: expression giving the gold index; generate: the reference text (or list of texts)."""
    target: str = ""
    """Template of a solved example's answer in few-shot prompts (multiple_choice: the gold ending by default)."""
    target_delimiter: str = " "
    """Between the context and an ending (or a few-shot example's answer), as lm-eval."""
    few_shot: FewShot = field(default_factory=FewShot)
    until: list[str] = field(default_factory=list)
    """generate, code: stop strings."""
    max_tokens: int = 128
    """generate, code: tokens to generate at most."""
    stride: int = 0
    """perplexity: tokens each window advances (0: half the model's context)."""
    samples_per_problem: int = 1
    """code: completions per problem (pass@k for k <= this)."""
    temperature: float = 0.0
    """generate, code: 0 is greedy."""
    candidates: int = 1000
    """canary: other possible canaries each one is ranked among (exposure's sampling estimate)."""
    source: str = ""
    """Where the data comes from and its licence, for a person reading the file."""

    def validate(self) -> None:
        needs = {"perplexity": ["prompt"], "multiple_choice": ["prompt", "choices", "answer"], "generate": ["prompt"]}
        for key in needs.get(self.family, []):
            check(bool(getattr(self, key)), f"task {self.name}: family {self.family} needs `{key}`; add it to the YAML")
        check(bool(self.metrics), f"task {self.name}: `metrics` is empty; name at least one")
        known = METRICS.get(self.family)
        for m in self.metrics:
            ok = m.startswith("pass@") if known is None else m in known
            choices = "pass@k" if known is None else ", ".join(sorted(known))
            check(ok, f"task {self.name}: family {self.family} has no metric {m!r}; choose from {choices}")
        check(self.max_tokens >= 1, f"task {self.name}: max_tokens={self.max_tokens} must be >= 1")
        check(self.stride >= 0, f"task {self.name}: stride={self.stride} must be >= 0")
        check(self.samples_per_problem >= 1, f"task {self.name}: samples_per_problem must be >= 1")
        check(self.candidates >= 1, f"task {self.name}: candidates={self.candidates} must be >= 1")
        probe_format = {"bias": "bias_probes", "canary": "canaries"}.get(self.family, self.format)
        check(
            self.format == probe_format, f"task {self.name}: family {self.family} reads format {probe_format}; set it"
        )
        for key in ("prompt", "target", "choices", "answer"):
            text = getattr(self, key)
            try:
                _JINJA.parse(text if key in ("prompt", "target") or not text else f"{{{{{text}}}}}")
            except jinja2.TemplateSyntaxError as e:
                raise LmforgeError(f"task {self.name}: `{key}` is not a valid template ({e})") from None

    def render(self, template: str, item: dict[str, Any]) -> str:
        return _template(template).render(**item)

    def value(self, expression: str, item: dict[str, Any]) -> Any:
        return _expression(expression)(**item)


@functools.lru_cache(maxsize=128)
def _template(text: str) -> jinja2.Template:
    return _JINJA.from_string(text)  # compiling takes ~1 ms: once per template, not once per item


@functools.lru_cache(maxsize=128)
def _expression(text: str):
    return _JINJA.compile_expression(text, undefined_to_none=False)


def task_names() -> list[str]:
    return sorted(p.stem for p in TASK_DIR.glob("*.yaml"))


def load_task(name_or_path: str) -> Task:
    """A task by name (configs/eval/NAME.yaml) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = TASK_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise LmforgeError(f"no task {name_or_path!r}; pick one of {', '.join(task_names())} or give a YAML file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LmforgeError(f"task file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict) or not values:
        raise LmforgeError(f"task file {path} is empty or not a mapping; see configs/eval/hellaswag.yaml")
    values.setdefault("name", path.stem)
    for key in ("family", "metrics"):
        if key not in values:
            raise LmforgeError(f"task file {path} has no `{key}`; add it (families: {', '.join(FAMILIES)})")
    try:
        return from_dict(Task, values, "")
    except LmforgeError as e:
        raise LmforgeError(f"task file {path}: {e}") from None


def read_items(task: Task, path: str | Path) -> list[dict[str, Any]]:
    """The items of a data file in the task's format."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"data file {path} for task {task.name} does not exist; pass the file with --data")
    text = path.read_text(encoding="utf-8")
    if task.format == "text":
        items = [{"text": text}] if text.strip() else []
    elif task.format == "parallel":
        refs = Path(task.references)
        if not refs.is_file():
            raise LmforgeError(f"reference file {refs} of task {task.name} does not exist; set `references`")
        sources, targets = text.splitlines(), refs.read_text(encoding="utf-8").splitlines()
        if len(sources) != len(targets):
            raise LmforgeError(f"{path} has {len(sources)} lines and {refs} {len(targets)}; give aligned files")
        items = [{"source": s, "reference": r} for s, r in zip(sources, targets, strict=True)]
    elif task.format in ("bias_probes", "canaries"):
        items = _probe_items(task, path)
    elif task.format == "csv":
        items = list(csv.DictReader(text.splitlines()))
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LmforgeError(f"{path}:{n} is not JSON ({e}); fix or remove the line") from None
    if not items:
        raise LmforgeError(f"data file {path} holds no items; pass a non-empty {task.format} file")
    return items


def _probe_items(task: Task, path: Path) -> list[dict[str, Any]]:
    """The sentences whose log-likelihoods the bias and canary families compare."""
    from lmforge.eval import safety

    if task.format == "bias_probes":
        probes = safety.load_bias_probes(path)
        return [{"probe": name, **vars(p)} for name, probe in probes.items() for p in safety.bias_pairs(*probe)]
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        seed, planted, controls = record["seed"], record["planted"], record["controls"]
    except (ValueError, KeyError, TypeError) as e:
        raise LmforgeError(f"{path} is not a canaries.json ({e!r}); plant canaries with `lmforge pretrain "
                           "data.canaries=N`") from None  # fmt: skip
    # the generator's canaries after those drawn for planting, so no candidate is a planted one or a control
    candidates = safety.make_canaries(len(planted) + len(controls) + task.candidates, seed)[-task.candidates :]
    return [
        *({"text": c, "role": "planted"} for c in planted),
        *({"text": c, "role": "control"} for c in controls),
        *({"text": c, "role": "candidate"} for c in candidates),
    ]


def few_shot_prefix(task: Task, pool: list[dict[str, Any]], index: int, k: int) -> str:
    """The first k solved examples of `pool` other than item `index` (deterministic: lm-eval's `first_n` sampler),
    each as prompt + delimiter + target, followed by the separator."""
    if k == 0:
        return ""
    shots = [item for i, item in enumerate(pool) if i != index][:k]
    parts = [task.render(task.prompt, s) + task.target_delimiter + shot_target(task, s) for s in shots]
    return "".join(p + task.few_shot.separator for p in parts)


def shot_target(task: Task, item: dict[str, Any]) -> str:
    if task.target:
        return task.render(task.target, item)
    if task.family == "multiple_choice":
        return task.value(task.choices, item)[task.value(task.answer, item)]
    return str(task.value(task.answer, item))
