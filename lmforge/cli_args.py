"""Argument types for the CLI's tools: each turns a flag's text into a value in its range or raises
argparse.ArgumentTypeError, which the parser reports as one line naming the flag (exit 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def finite_float(text: str) -> float:
    """A float that is neither nan nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def float_in(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (or (low, high] with low_open)."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if value < low or (low_open and value == low) or value > high:
            bound = f"must be {'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} {bound}" + ("" if high == math.inf else f" and <= {high:g}"))
        return value

    parse.__name__ = "number"  # argparse names the type in its "invalid <type> value" message
    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        value = integer(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value} must be >= {low}" if high is None else f"{value} is not in {low}..{high}"
            )
        return value

    parse.__name__ = "whole number"
    return parse


non_negative_float = float_in(0.0)
positive_float = float_in(0.0, low_open=True)
probability = float_in(0.0, 1.0, low_open=True)
"""(0, 1]: top-p, a fraction of a resource."""
non_negative_int = int_in(0)
positive_int = int_in(1)
port = int_in(0, 65535)
"""A TCP port; 0 asks the system for a free one."""
seed = int_in(0, 2**64 - 1)
"""What torch.Generator.manual_seed takes without wrapping around."""


def text(value: str) -> str:
    """Text that is valid UTF-8: bytes that are not reach Python as lone surrogates, which no tokenizer encodes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text") from None
    return value


def name(value: str) -> str:
    """A folder name: not a path, so `--name` cannot place a run outside its root."""
    if not value or value in (".", "..") or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a plain folder name (no '/', not '.' or '..')")
    return value


def name_and_path(value: str) -> tuple[str, str]:
    """NAME=PATH, as `--lora` takes it: a model name clients ask for and the folder that holds it."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=DIR (for example --lora sql=runs/sql/adapter)")
    return name, path
