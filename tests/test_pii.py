"""The PII masker (workspace/pii.py) as a component: a table of written forms (every leak of issue 28 among them),
what must stay as it is, and Hypothesis properties: generated RRNs, cards, phone numbers and e-mail addresses inside
random Korean/English/number context never survive, and text without PII comes back unchanged."""
from __future__ import annotations

import datetime
import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workspace.pii import PLACEHOLDERS, _card_windows_numpy, _card_windows_small, _merge, find_pii, luhn_ok, mask_pii

FW = str.maketrans("0123456789-@", "０１２３４５６７８９－＠")  # full-width digits, dash and at sign

# (written form, placeholder): each is masked whole inside Korean context
FORMS = [
    # resident registration numbers
    ("900101-1234567", "<RRN>"), ("9001011234567", "<RRN>"), ("900101 - 2234567", "<RRN>"),
    ("020315-3234567", "<RRN>"), ("020315 4234567", "<RRN>"), ("900101–1234567", "<RRN>"),  # en dash
    ("900101—1234567", "<RRN>"), ("900101‐1234567", "<RRN>"), ("900101−1234567", "<RRN>"),  # em dash, hyphen, minus
    ("900101ㅡ1234567", "<RRN>"), ("900101\t-\t1234567", "<RRN>"), ("900101-1234567".translate(FW), "<RRN>"),
    ("850230-1234567".replace("0230", "0228"), "<RRN>"), ("991231-2000000", "<RRN>"), ("000229-3123456", "<RRN>"),
    # payment cards
    ("378282246310005", "<CARD>"), ("4111 1111 1111 1111", "<CARD>"), ("4111-1111-1111-1111", "<CARD>"),
    ("5555555555554444", "<CARD>"), ("6011000990139424", "<CARD>"), ("4222222222222", "<CARD>"),
    ("4111.1111.1111.1111", "<CARD>"), ("4111 - 1111 - 1111 - 1111", "<CARD>"), ("4111–1111–1111–1111", "<CARD>"),
    ("4111 1111 1111 1111".translate(FW), "<CARD>"), ("3782 822463 10005", "<CARD>"), ("4111\t1111\t1111\t1111", "<CARD>"),
    ("4111  1111  1111  1111", "<CARD>"), ("6011-0009-9013-9424", "<CARD>"),
    # phone numbers
    ("010-1234-5678", "<PHONE>"), ("010.1234.5678", "<PHONE>"), ("010 1234 5678", "<PHONE>"), ("01012345678", "<PHONE>"),
    ("(010) 1234-5678", "<PHONE>"), ("+82 10-1234-5678", "<PHONE>"), ("+821012345678", "<PHONE>"),
    ("+82-2-345-6789", "<PHONE>"), ("+82 (0)2 345 6789", "<PHONE>"), ("(02) 1234-5678", "<PHONE>"),
    ("02)1234-5678", "<PHONE>"), ("02-345-6789", "<PHONE>"), ("031-987-6543", "<PHONE>"), ("(031)987-6543", "<PHONE>"),
    ("064.123.4567", "<PHONE>"), ("070-8765-4321", "<PHONE>"), ("0505-123-4567", "<PHONE>"),
    ("(+82) 10 9876 5432", "<PHONE>"), ("010 - 1234 - 5678", "<PHONE>"), ("010‐1234‐5678", "<PHONE>"),
    ("010–1234–5678", "<PHONE>"), ("010\t1234\t5678", "<PHONE>"), ("010ㅡ1234ㅡ5678", "<PHONE>"),
    ("82-10-1234-5678", "<PHONE>"), ("0082-10-1234-5678", "<PHONE>"), ("+82 010-1234-5678", "<PHONE>"),
    ("010-1234-5678".translate(FW), "<PHONE>"), ("+82 (10) 1234 5678", "<PHONE>"), ("011-123-4567", "<PHONE>"),
    ("010\u00a01234\u00a05678", "<PHONE>"), ("010\u30001234\u30005678", "<PHONE>"),  # no-break and ideographic spaces
    # e-mail addresses
    ("a.b-c@example.co.kr", "<EMAIL>"), ("x+y@mail.com", "<EMAIL>"), ("kim＠naver.com", "<EMAIL>"),
    ("홍길동@회사.한국", "<EMAIL>"), ("kim @ naver.com", "<EMAIL>"), ("user_01@sub.domain.org", "<EMAIL>"),
    ("김철수.kim@example.com", "<EMAIL>"), ("kim@naver.com".translate(FW), "<EMAIL>"),
]


def test_the_table_has_every_kind_and_at_least_60_forms():
    assert len(FORMS) >= 60 and {p for _, p in FORMS} == set(PLACEHOLDERS.values())


@pytest.mark.parametrize("form,placeholder", FORMS, ids=[repr(f) for f, _ in FORMS])
def test_every_written_form_is_masked_whole(form, placeholder):
    cases = [(f"연락처: {form} 입니다", f"연락처: {placeholder} 입니다"), (f"[{form}]", f"[{placeholder}]"),
             (form, placeholder)]
    if placeholder != "<EMAIL>":  # an address glued to the word before it takes that word with it (documented)
        cases.append((f"번호{form}로 연락", f"번호{placeholder}로 연락"))
    for text, want in cases:
        assert mask_pii(text) == want, text


@pytest.mark.parametrize("text,want", [
    # a card followed by its expiry or CVC: the card is masked, the rest stays
    ("카드 4111 1111 1111 1111 12/25 입니다", "카드 <CARD> 12/25 입니다"),
    ("4111 1111 1111 1111 123", "<CARD> 123"),
    ("4111111111111111/12/25", "<CARD>/12/25"),
    # two values side by side
    ("010-1234-5678, kim@naver.com", "<PHONE>, <EMAIL>"),
    ("900101-1234567 010-1234-5678", "<RRN> <PHONE>"),
    ("메일은 kim@naver.com으로 보내 주세요", "메일은 <EMAIL>으로 보내 주세요"),
    ("kim@naver.com.", "<EMAIL>."),
    ("a@b.com.123", "<EMAIL>.123"),
])
def test_pii_next_to_other_text(text, want):
    assert mask_pii(text) == want


@pytest.mark.parametrize("text", [
    "1234567890123",  # 13 digits, month 56: no RRN; fails Luhn: no card
    "991332-1234567",  # no 13th month
    "4111111111111118",  # Luhn fails, and no 13-15 digit part of it passes
    "주문 3건, 2024-01-15 등록, 수량 12345, 포트 8080, 버전 1.2.3, 100,000원, 3.14159265358979",
    "2023년 10월 20일 14:30",
    "a3f0101234567b",  # a hex id: glued to ASCII letters, not a phone number
    "id 5f3e9001011234567aa",  # nor an RRN
    "sha 0x01012345678",
    "IP 192.168.100.200, 10.0.0.1",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14",  # small numbers in a row are not one card
    "금액 1,234,567,890,123원",
    "이메일 형식: 이름@도메인",  # no domain with a dot
    "a@b", "user@localhost", "@@@@", "@ naver.com",
    "010-12-5678", "02-12-345",  # too short for a phone
    "Order 20240115-0001",
    "",
])
def test_ordinary_text_stays_as_it_is(text):
    assert mask_pii(text) == text and find_pii(text) == []


def test_counts_and_find_report_what_was_masked():
    text = "a 010-1234-5678 b 900101-1234567 c kim@naver.com d 4111 1111 1111 1111 e ０１０-１２３４-５６７８"
    counts = Counter()
    assert mask_pii(text, counts) == "a <PHONE> b <RRN> c <EMAIL> d <CARD> e <PHONE>"
    assert counts == Counter(phone=2, rrn=1, email=1, card=1)
    assert find_pii(text) == [("phone", "010-1234-5678"), ("rrn", "900101-1234567"), ("email", "kim@naver.com"),
                              ("card", "4111 1111 1111 1111"), ("phone", "０１０-１２３４-５６７８")]


def test_the_long_run_and_the_short_run_find_the_same_card_windows():
    rng = random.Random(7)
    for _ in range(2000):
        groups = ["".join(rng.choice("0123456789") for _ in range(rng.randint(3, 21))) for _ in range(rng.randint(1, 5))]
        run = "".join(g + (rng.choice([" ", "-", ".", "  "]) if i < len(groups) - 1 else "") for i, g in enumerate(groups))
        assert _merge(_card_windows_small(run)) == _card_windows_numpy(run), run


# ------------------------------------------------------------------------------------------------ properties
KO = "가나다라마바사아자차카타파하은는이가을를에서으로와과도"
EN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SEPS = ["-", "", " ", " - ", "–", "‐", "ㅡ", "\t", "."]


@st.composite
def rrns(draw):
    day = draw(st.dates(datetime.date(1900, 1, 1), datetime.date(2025, 12, 31)))
    gender = draw(st.sampled_from("1256" if day.year < 2000 else "3478"))
    rest = draw(st.text("0123456789", min_size=6, max_size=6))
    sep = draw(st.sampled_from(["-", "", " ", " - ", "–", "ㅡ", "\t"]))
    value = f"{day:%y%m%d}{sep}{gender}{rest}"
    return value.translate(FW) if draw(st.booleans()) and draw(st.booleans()) else value


@st.composite
def cards(draw):
    n = draw(st.integers(13, 19))
    body = draw(st.text("0123456789", min_size=n - 1, max_size=n - 1).filter(lambda s: s[0] != "0"))
    check = next(c for c in "0123456789" if luhn_ok(body + c))
    digits = body + check
    sep = draw(st.sampled_from(["", " ", "-", ".", " - ", "–"]))
    layout = {14: (4, 6, 4), 15: (4, 6, 5), 16: (4, 4, 4, 4), 19: (4, 4, 4, 4, 3)}.get(n)  # how cards are printed
    if sep and layout:
        cuts = [sum(layout[:i]) for i in range(len(layout) + 1)]
        value = sep.join(digits[a:b] for a, b in zip(cuts, cuts[1:]))
    else:
        value = digits
    return value.translate(FW) if draw(st.booleans()) and draw(st.booleans()) else value


@st.composite
def phones(draw):
    area = draw(st.sampled_from(["10", "11", "16", "17", "18", "19", "2", "31", "32", "33", "41", "42", "43", "51",
                                 "52", "53", "54", "55", "61", "62", "63", "64", "70", "505"]))
    mid = draw(st.text("0123456789", min_size=3, max_size=4))
    last = draw(st.text("0123456789", min_size=4, max_size=4))
    sep = draw(st.sampled_from(SEPS))
    form = draw(st.sampled_from(["domestic", "parens", "plus", "plus0", "(+82)", "0082", "82"]))
    if form == "domestic":
        value = f"0{area}{sep}{mid}{sep}{last}"
    elif form == "parens":
        value = f"(0{area}){sep or ' '}{mid}{sep}{last}"
    elif form == "plus":
        value = f"+82{sep}{area}{sep}{mid}{sep}{last}"
    elif form == "plus0":
        value = f"+82 (0){area} {mid} {last}"
    elif form == "(+82)":
        value = f"(+82) {area}{sep}{mid}{sep}{last}"
    elif form == "0082":
        value = f"0082{sep}{area}{sep}{mid}{sep}{last}"
    else:
        value = f"82{sep if sep.strip() and sep != '.' else '-'}{area}{sep}{mid}{sep}{last}"
    return value.translate(FW) if draw(st.booleans()) and draw(st.booleans()) else value


@st.composite
def emails(draw):
    local = draw(st.text(EN + "0123456789._+-" + KO, min_size=1, max_size=20).filter(lambda s: s.strip("._+-")))
    label = st.text(EN.lower() + "0123456789-", min_size=1, max_size=10)
    labels = draw(st.lists(label, min_size=1, max_size=3))
    tld = draw(st.text(EN.lower(), min_size=2, max_size=6))
    at = draw(st.sampled_from(["@", "＠", " @ "]))
    return f"{local}{at}{'.'.join(labels)}.{tld}"


words = st.text(KO + EN + " ,.!?", min_size=0, max_size=30)
# context numbers: never two in a row (a word between), never a leading 0, at most 8 digits
numbers = st.integers(1, 99_999_999).map(str)
context = st.lists(st.one_of(words, numbers.map(lambda n: f" {n}개 ")), max_size=6).map("".join)
EXAMPLES = int(os.environ.get("PII_EXAMPLES", "300"))  # PII_EXAMPLES=4000 for a deeper search (36 s here)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(left=context, right=context, value=st.one_of(rrns(), cards(), phones(), emails()),
       glue=st.sampled_from([" ", "", "\n", ": ", "("]))
def test_generated_pii_never_survives_in_context(left, right, value, glue):
    # glued to Hangul or punctuation, never to an ASCII letter or digit (documented: that is not PII, e.g. hex ids)
    left = left if (not left or not left[-1].isascii() or not left[-1].isalnum()) or glue else left + " "
    right = right if not right or not right[0].isascii() or not right[0].isalnum() else " " + right
    text = f"{left}{glue}{value} {right}"
    masked = mask_pii(text)
    assert value not in masked, (text, masked)
    assert any(p in masked for p in PLACEHOLDERS.values())
    assert find_pii(masked) == []  # masking is complete: a second pass finds nothing


@SETTINGS
@given(text=context)
def test_text_without_pii_comes_back_unchanged(text):
    assert mask_pii(text) == text


def test_long_runs_and_short_runs_give_the_same_numbers():
    """A run over 64 characters goes through numpy (RRNs and cards together); the same values in short runs, one by
    one, give the same masks."""
    rng = random.Random(11)
    values = ["900101-1234567", "9001011234567", "4111 1111 1111 1111", "4111111111111111", "123", "5555555555554444",
              "020315 4234567", "1234567890123", "0000000000000", "991332-1234567"]
    for _ in range(300):
        parts = [rng.choice(values) for _ in range(rng.randint(5, 12))]
        long_text = " ".join(parts)  # one run of many groups
        short_text = " x ".join(parts)  # the same values, each its own run
        want = [mask_pii(p) for p in parts]
        assert mask_pii(short_text).split(" x ") == want
        if len(long_text) > 64:
            got = mask_pii(long_text)
            assert "<" in got or not any("<" in w for w in want), (long_text, got)
            assert find_pii(got) == []


def test_a_long_text_is_scanned_where_numbers_are_and_finds_what_a_whole_scan_finds(monkeypatch):
    """Texts from 4,096 characters are scanned only around their digit runs (workspace/pii.py, _regions): on random
    long texts of phone numbers, cards, RRNs, digit runs, separators, `+`, `(`, letters and Hangul, the spans are
    exactly those of a scan of the whole text."""
    from workspace import pii

    rng = random.Random(5)
    pieces = ["0", "1", "2", "8", "+", "(", ")", " ", "-", ".", "a", "가", "@", "x.com", "010", "82", "4111", "\t", "１"]
    values = ["010-1234-5678", "+82 10 9876 5432", "(02) 345-6789", "4111 1111 1111 1111", "900101-1234567",
              "0082-10-1111-2222", "82-10-1234-5678", "(+82) 10 9876 5432", "010 - 1234 - 5678"]
    texts = []
    for _ in range(120):
        parts: list[str] = []
        while sum(map(len, parts)) < rng.choice([5000, 9000, 20000]):
            k = rng.random()
            parts.append(rng.choice(values) if k < 0.1 else
                         "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20))) if k < 0.4 else
                         rng.choice(pieces))
        texts.append(pii._view("".join(parts)))
    regional = [(pii._phone_spans(v), pii._number_spans(v)) for v in texts]
    monkeypatch.setattr(pii, "_PREFILTER_FROM", 10 ** 12)
    whole = [(pii._phone_spans(v), pii._number_spans(v)) for v in texts]
    assert regional == whole
    assert sum(len(p) + len(r) + len(c) for p, (r, c) in whole) > 1000  # the texts do hold numbers of every kind
