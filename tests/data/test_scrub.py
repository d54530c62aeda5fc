import pytest

from lmforge.config import from_dict
from lmforge.data.scrub import ScrubConfig, scrub
from lmforge.errors import LmforgeError

CFG = ScrubConfig()
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\nabc+/=\n-----END RSA PRIVATE KEY-----"

POSITIVES = [
    ("mail me at jane.doe+lists@example.co.uk today", "mail me at <EMAIL> today", "email"),
    ("call +44 20 7946 0958 now", "call <PHONE> now", "phone"),
    ("call (555) 123-4567.", "call <PHONE>.", "phone"),
    ("call 555-123-4567 or 555.123.4567", "call <PHONE> or <PHONE>", "phone"),
    ("server 192.168.0.1 is up", "server <IP> is up", "ip"),
    ("at 255.255.255.0.", "at <IP>.", "ip"),
    ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 full", "v6 <IP> full", "ip"),
    ("v6 2001:db8::8a2e:370:7334 short", "v6 <IP> short", "ip"),
    ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("card 5500-0000-0000-0004 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("card 378282246310005 ok", "card <CREDIT_CARD> ok", "credit_card"),
    ("ssn 123-45-6789 on file", "ssn <GOV_ID> on file", "gov_id"),
    ("key AKIAIOSFODNN7EXAMPLE here", "key <SECRET> here", "secrets"),
    ("tok ghp_" + "a1B2" * 9 + " here", "tok <SECRET> here", "secrets"),
    ("slack xoxb-123456789012-abcdefABCDEF here", "slack <SECRET> here", "secrets"),
    ('api_key = "sk_live_4eC39HqLyjWDarjtT1zdp7dc"', 'api_key = "<SECRET>"', "secrets"),
    ("CLIENT_SECRET=Zx9Qw8Er7Ty6Ui5Op4As", "CLIENT_SECRET=<SECRET>", "secrets"),
    (f"before\n{PEM}\nafter", "before\n<SECRET>\nafter", "secrets"),
]

NEGATIVES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "in 1999 and 2024 we shipped 12,000 units",
    "on 2024-01-15 at 12:30:45",
    "version 3.11.7 and release 1.2.3",
    "bad address 999.1.1.1 and 1.2.3.4.5",
    "ssn-like 000-12-3456, 666-12-3456 and 912-34-5678",
    "std::vector and a[::2] and x::y",
    "mac 00:1a:2b:3c:4d:5e",
    "the secret: is out",
    "api_key=short",
    "2 + 2 = 4 and +1 2",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.mark.parametrize(("text", "expected", "kind"), POSITIVES)
def test_scrubs_each_kind(text, expected, kind):
    out, counts = scrub(text, CFG)
    assert out == expected
    assert counts[kind] == sum(counts.values()) == expected.count("<")


@pytest.mark.parametrize("text", NEGATIVES)
def test_leaves_non_pii_unchanged(text):
    out, counts = scrub(text, CFG)
    assert out == text
    assert counts == dict.fromkeys(("email", "phone", "ip", "credit_card", "gov_id", "secrets"), 0)


def test_counts_and_idempotence():
    text = " ".join(t for t, _, _ in POSITIVES) + " " + " ".join(NEGATIVES)
    once, counts = scrub(text, CFG)
    assert counts == {"email": 1, "phone": 4, "ip": 4, "credit_card": 3, "gov_id": 1, "secrets": 6}
    twice, again = scrub(once, CFG)
    assert twice == once
    assert sum(again.values()) == 0


def test_disabled_kinds_are_kept():
    text = "a@b.com 192.168.0.1"
    out, counts = scrub(text, ScrubConfig(email=False))
    assert out == "a@b.com <IP>"
    assert "email" not in counts and counts["ip"] == 1


def test_config_validation():
    assert from_dict(ScrubConfig, {"phone": False}).phone is False
    with pytest.raises(LmforgeError, match="phone"):
        from_dict(ScrubConfig, {"phone": "yes"})
    with pytest.raises(LmforgeError, match="scrub.ip"):
        ScrubConfig(ip=1).validate()
