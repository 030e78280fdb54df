"""PII masking for Korean text: e-mail addresses, resident registration numbers (주민등록번호), payment card
numbers and phone numbers, replaced by <EMAIL>, <RRN>, <CARD>, <PHONE>.

One masker for everything the workspace writes from user data: the prepared splits, quarantine snippets, stats,
error messages and MLflow records (finetune/prepare.py), and later the gateway's logs. Mask a text *before* it is
truncated, written or logged: a number cut in half no longer looks like one.

Candidates are found by pattern, then checked, so ordinary numbers stay:
  - RRN: YYMMDD-GNNNNNN, with or without the hyphen (or a space); the date must exist in the century its gender
    digit names (1/2/5/6: 1900s, 3/4/7/8: 2000s; 9/0: 1800s). The check digit is not required: numbers issued
    since October 2020 no longer carry one.
  - card: 13 to 19 digits, optionally in groups split by spaces or hyphens, that pass the Luhn check.
  - phone: mobile 010/011/016/017/018/019, Seoul 02, the regional 0[3-6][1-5], 070 and 050x, written with
    hyphens, dots, spaces, parentheses around the area code, or none, and in the international form +82 with or
    without the leading 0 ("+82 10-...", "+82-2-...", "+82 (0)2 ...").
Written here rather than taken from a library: the general PII detectors (presidio, scrubadub) do not know
Korean RRN dates or Korean numbering plans and pull in NLP models; these four patterns are what the data has.
"""
from __future__ import annotations

import datetime
import re
from collections import Counter
from typing import Optional

PLACEHOLDERS = {"email": "<EMAIL>", "rrn": "<RRN>", "card": "<CARD>", "phone": "<PHONE>"}
KINDS = tuple(PLACEHOLDERS)

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_RRN = re.compile(r"(?<!\d)(\d{2})(\d{2})(\d{2})[ \t]?(?:-[ \t]?)?([0-9])(\d{6})(?!\d)")
_CARD = re.compile(r"(?<!\d)\d(?:[ \-]?\d){12,18}(?!\d)")
_AREA = r"(?:1[016789]|2|[3-6][1-5]|70|50[2-8])"
_PHONE = re.compile(
    r"(?<![\d+])(?:\+82[ \-.]?(?:\(0\)[ \-.]?)?(?:\(" + _AREA + r"\)|" + _AREA + r")"  # +82 10 / +82 (0)2 / +82-(2)
    r"|\(0" + _AREA + r"\)|0" + _AREA + r"\)?)"  # 010 / (02) / 02)
    r"[ \-.]?\d{3,4}[ \-.]?\d{4}(?!\d)")
_CENTURY = {"1": 1900, "2": 1900, "5": 1900, "6": 1900, "3": 2000, "4": 2000, "7": 2000, "8": 2000,
            "9": 1800, "0": 1800}


def is_rrn(yy: str, mm: str, dd: str, gender: str) -> bool:
    """A date that exists in the century the gender digit names (so 1234567890123 is not an RRN)."""
    try:
        datetime.date(_CENTURY[gender] + int(yy), int(mm), int(dd))
    except ValueError:
        return False
    return True


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _rrn(m: re.Match) -> Optional[str]:
    return PLACEHOLDERS["rrn"] if is_rrn(m[1], m[2], m[3], m[4]) else None


def _card(m: re.Match) -> Optional[str]:
    digits = re.sub(r"\D", "", m[0])
    return PLACEHOLDERS["card"] if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


_RULES = (("email", _EMAIL, lambda m: PLACEHOLDERS["email"]), ("rrn", _RRN, _rrn), ("card", _CARD, _card),
          ("phone", _PHONE, lambda m: PLACEHOLDERS["phone"]))


def mask_pii(text: str, counts: Optional[Counter] = None) -> str:
    """`text` with every e-mail, RRN, card and phone number replaced by its placeholder; `counts[kind]` += found."""
    if not text:
        return text
    for kind, pattern, check in _RULES:
        def sub(m: re.Match, kind=kind, check=check) -> str:
            out = check(m)
            if out is None:
                return m[0]
            if counts is not None:
                counts[kind] += 1
            return out

        text = pattern.sub(sub, text)
    return text


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, matched text) of every PII value the masker would replace, in masking order: what tests and audits
    look for."""
    hits: list[tuple[str, str]] = []
    for kind, pattern, check in _RULES:
        hits += [(kind, m[0]) for m in pattern.finditer(text) if check(m) is not None]
        text = pattern.sub(lambda m, check=check: check(m) or m[0], text)
    return hits
