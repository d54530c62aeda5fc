"""Instruction pairs mined from the embedded corpus itself: a documented standard-library function's signature and
docstring summary as the instruction, its code without the docstring as the answer (the speedrun's fine-tuning data)."""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator

from lmforge.data.corpus import embedded_corpus


def function_pairs(source: str) -> Iterator[dict[str, str]]:
    """{prompt, completion} for each function of `source` whose docstring opens with a summary paragraph."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.decorator_list:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        first = node.body[0]  # the docstring's statement
        if len(node.body) < 2 or len(summary) < 20:
            continue
        code = lines[node.lineno - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        prompt = f"Write the Python function {node.name}({ast.unparse(node.args)}): {summary}"
        yield {"prompt": prompt, "completion": textwrap.dedent("\n".join(code))}


def mine_pairs(count: int, max_chars: int = 600, per_file: int = 3) -> list[dict[str, str]]:
    """Up to `count` pairs whose answer has at most `max_chars` characters, at most `per_file` from each module (for
    variety), in the corpus's fixed order."""
    pairs: list[dict[str, str]] = []
    for doc in embedded_corpus():
        if not doc.id.endswith(".py"):
            continue
        taken = 0
        for pair in function_pairs(doc.text):
            if len(pair["completion"]) <= max_chars:
                pairs.append(pair)
                taken += 1
                if len(pairs) == count:
                    return pairs
                if taken == per_file:
                    break
    return pairs
