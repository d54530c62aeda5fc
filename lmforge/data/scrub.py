"""Privacy scrubbing before training: personal data and secrets become typed placeholders, in the spirit of the PII
redaction used for The Stack / StarCoder (Li et al. 2023, section 4) and BigScience ROOTS (Laurençon et al. 2022)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

from lmforge.config import check


@dataclass
class ScrubConfig:
    email: bool = True
    """Replace e-mail addresses with <EMAIL>."""
    phone: bool = True
    """Replace international (+CC) and North-American phone numbers with <PHONE>."""
    ip: bool = True
    """Replace IPv4 and IPv6 addresses with <IP>."""
    credit_card: bool = True
    """Replace 13-19 digit card numbers that pass the Luhn check with <CREDIT_CARD>."""
    gov_id: bool = True
    """Replace US social security numbers (ddd-dd-dddd) with <GOV_ID>."""
    secrets: bool = True
    """Replace private keys, cloud and chat tokens and api_key=... values with <SECRET>."""

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            check(isinstance(value, bool), f"scrub.{f.name}={value!r} must be true or false")


# Boundaries: a match must not start or end inside a longer word or number ("1.2.3.4.5", "x4111...").
_L = r"(?<![\w.+-])"
_R = r"(?![\w-]|\.\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_H = r"[0-9a-fA-F]{1,4}"

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----", re.DOTALL
)
_TOKENS = re.compile(
    r"\b(?:(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,})\b"  # Slack tokens
)
# Keeps the key so the code around it still reads naturally; only the value (16+ chars) is replaced.
_ASSIGNMENT = re.compile(
    r"(?i)\b((?:[a-z0-9]+[_-])*(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|access[_-]?token"
    r"|token|passw(?:or)?d))(\s*[:=]\s*[\"']?)([A-Za-z0-9_\-/+=.]{16,})"
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:"
    rf"(?:{_H}:){{7}}{_H}"
    rf"|(?:{_H}:){{1,7}}:"
    rf"|(?:{_H}:){{1,6}}:{_H}"
    rf"|(?:{_H}:){{1,5}}(?::{_H}){{1,2}}"
    rf"|(?:{_H}:){{1,4}}(?::{_H}){{1,3}}"
    rf"|(?:{_H}:){{1,3}}(?::{_H}){{1,4}}"
    rf"|(?:{_H}:){{1,2}}(?::{_H}){{1,5}}"
    rf"|{_H}:(?::{_H}){{1,6}}"
    rf"|:(?::{_H}){{1,7}}"
    r")(?![\w:]|\.\d)"
)
_IPV4 = re.compile(rf"{_L}{_OCTET}(?:\.{_OCTET}){{3}}{_R}")
_CARD = re.compile(rf"{_L}(?:\d[ -]?){{12,18}}\d{_R}")
_SSN = re.compile(rf"{_L}(?!000|666|9\d\d)\d{{3}}-(?!00)\d{{2}}-(?!0000)\d{{4}}{_R}")
_PHONE = re.compile(
    rf"{_L}(?:\+[1-9]\d{{0,2}}(?:[ .-]?\(?\d{{1,5}}\)?){{1,6}}"  # international, digit count checked below
    r"|(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4})" + _R  # North American, separators required
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card_ok(m: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _phone_ok(m: re.Match[str]) -> bool:
    # E.164 numbers have at most 15 digits; fewer than 8 after a "+" is more likely arithmetic than a phone.
    return m.group().startswith("(") or not m.group().startswith("+") or 8 <= sum(c.isdigit() for c in m.group()) <= 15


def _ipv6_ok(m: re.Match[str]) -> bool:
    # At least three groups: "a::b" is C++ scope syntax and "::1" is loopback, neither is personal.
    return sum(1 for g in m.group().split(":") if g) >= 3


# (type, placeholder, pattern, accept, needs): applied in this order, because a private key contains token-like runs
# and a card number contains phone-like runs. A rule runs only on text containing one of `needs`, which every match
# contains: a substring test is ~50x cheaper than a regex scan that finds nothing (most text has no ':', '=' or '@').
_RULES: list[tuple[str, str, re.Pattern[str], Callable[[re.Match[str]], bool] | None, tuple[str, ...]]] = [
    ("secrets", "<SECRET>", _PRIVATE_KEY, None, ("PRIVATE KEY-----",)),
    ("secrets", "<SECRET>", _TOKENS, None, ("AKIA", "ASIA", "gh", "github_pat_", "xox")),
    ("secrets", "<SECRET>", _ASSIGNMENT, None, (":", "=")),
    ("email", "<EMAIL>", _EMAIL, None, ("@",)),
    ("ip", "<IP>", _IPV6, _ipv6_ok, (":",)),
    ("ip", "<IP>", _IPV4, None, (".",)),
    ("credit_card", "<CREDIT_CARD>", _CARD, _card_ok, ("",)),
    ("gov_id", "<GOV_ID>", _SSN, None, ("-",)),
    ("phone", "<PHONE>", _PHONE, _phone_ok, ("",)),
]


def scrub(text: str, cfg: ScrubConfig) -> tuple[str, dict[str, int]]:
    """Replace each enabled kind of personal data or secret with its placeholder; return the text and the number
    of replacements per enabled kind."""
    counts = {f.name: 0 for f in fields(cfg) if getattr(cfg, f.name)}
    for kind, placeholder, pattern, accept, needs in _RULES:
        if kind not in counts or not any(n in text for n in needs):
            continue

        def replace(m: re.Match[str], kind: str = kind, placeholder: str = placeholder, accept=accept) -> str:
            if accept is not None and not accept(m):
                return m.group()
            counts[kind] += 1
            return m.group(1) + m.group(2) + placeholder if m.re is _ASSIGNMENT else placeholder

        text = pattern.sub(replace, text)
    return text, counts
