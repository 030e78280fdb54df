"""PII masking for Korean text: e-mail addresses, resident registration numbers (주민등록번호), payment card
numbers and phone numbers, replaced by <EMAIL>, <RRN>, <CARD>, <PHONE>.

One masker for everything the workspace writes from user data: the prepared splits, quarantine snippets, stats,
error messages and MLflow records (finetune/prepare.py), and the gateway's stored usage, conversations, feedback and
errors (serving/gateway/). Mask a text *before* it is truncated, written or logged: a number cut in half no longer
looks like one.

How a text is read. Matching runs on a *view* of the text of the same length, character for character, so the
masked spans map back to the original exactly and nothing outside them changes: full-width ASCII (`０１０`, `＠`) and
every other Unicode decimal digit read as ASCII, every Unicode dash, the minus sign and the Hangul letter `ㅡ` read
as `-`, tabs and Unicode spaces read as a space. A number glued to an ASCII letter or digit on either side is not PII
(`a3f0101234567b` is a hex id, not a phone number); glued to Hangul or punctuation it is (`번호010-1234-5678로`).

Candidates are found by pattern, then checked, so ordinary numbers stay:
  - RRN: YYMMDD-GNNNNNN, with or without the hyphen (spaces around it allowed); the date must exist in the century its
    gender digit names (1/2/5/6: 1900s, 3/4/7/8: 2000s; 9/0: 1800s). The check digit is not required: numbers issued
    since October 2020 no longer carry one.
  - card: inside every run of digits (groups of 3 or more digits split by a space, tab, hyphen or dot count as one
    run), every window of 13 to 19 digits that passes the Luhn check, whether the window is a whole run, a run of
    groups, or a part of one group (`4111 1111 1111 1111 12/25` and `411111111111111112` keep only the trailing 12).
  - phone: mobile 010/011/016/017/018/019, Seoul 02, the regional 0[3-6][1-5], 070 and 050x, written with
    hyphens, dots, spaces (` - ` too), parentheses around the area code, or none, and in the international forms
    `+82`, `(+82)`, `0082` and `82-` with or without the leading 0 (`+82 10-...`, `+82 (0)2 ...`, `82-10-...`).
  - e-mail: a local part of letters of any script, digits and `._%+-`, `@` (spaces around it allowed), and a domain of
    ASCII or Hangul labels whose last label is two or more letters.

Linear time (benchmarks/pii.py measures 1 MB of adversarial text): every pattern starts only at the beginning of
a run (a lookbehind), eats the run possessively (no backtracking into it), and has bounded separators; the card
windows of a long digit run are checked with prefix sums in numpy rather than one by one; a long text is scanned for
numbers only around its digit runs (found with numpy), so text full of `+`, `0` or `8` that never becomes a number
costs no regex attempt per character.

Written here rather than taken from a library: the general PII detectors (presidio, scrubadub) do not know Korean
RRN dates or Korean numbering plans and pull in NLP models; these four kinds are what the data has.
"""
from __future__ import annotations

import datetime
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Optional

PLACEHOLDERS = {"email": "<EMAIL>", "rrn": "<RRN>", "card": "<CARD>", "phone": "<PHONE>"}
KINDS = tuple(PLACEHOLDERS)

# ------------------------------------------------------------------------------------------------ the view
_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d\u3161\u30fc\u2043"
_SPACES = "\t\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"


@lru_cache(maxsize=1)
def _view_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for cp in range(0xFF01, 0xFF5F):  # full-width ASCII: ！ .. ～ (０-９, Ａ-ｚ, ＠, ＋, （, ）, ．)
        table[cp] = chr(cp - 0xFEE0)
    for cp in range(0x80, 0x10000):  # every other decimal digit (Arabic-Indic, Devanagari, ...)
        ch = chr(cp)
        if unicodedata.category(ch) == "Nd":
            table[cp] = str(unicodedata.digit(ch))
    table[0xFE6B] = "@"  # small commercial at
    table.update({ord(c): "-" for c in _DASHES})
    table.update({ord(c): " " for c in _SPACES})
    return table


@lru_cache(maxsize=1)
def _mappable() -> re.Pattern:
    return re.compile("[" + "".join(re.escape(chr(cp)) for cp in sorted(_view_table())) + "]")


@lru_cache(maxsize=1)
def _lut():
    import numpy as np

    lut = np.arange(0x10000, dtype=np.uint32)
    for cp, ch in _view_table().items():
        lut[cp] = ord(ch)
    return lut


def _view(text: str) -> str:
    """The text as the patterns read it: same length, one character for one. Most texts have nothing to map (one
    scan in C says so); the others are mapped as an array of code points (str.translate with a dict costs ~100 ns a
    character)."""
    if text.isascii():
        return text.replace("\t", " ") if "\t" in text else text
    if _mappable().search(text) is None:
        return text
    import numpy as np

    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).copy()
    bmp = points < 0x10000
    points[bmp] = _lut()[points[bmp]]
    return points.tobytes().decode("utf-32-le")


# ------------------------------------------------------------------------------------------------ patterns
# Every pattern begins with a plain character (a digit, `(`, `+`, `@`), never with an assertion: the regex engine then
# skips to the next such character in C instead of trying the pattern at every position (5-10x faster on 1 MB). The
# start-of-number checks are lookbehinds placed right after that first character, looking two characters back.
_B = r"(?<![0-9A-Za-z][\s\S])(?<![0-9][.,][\s\S])"  # the first char was not glued to an ASCII letter/digit or a decimal
_B_PLUS = r"(?<![0-9A-Za-z+][\s\S])(?<![0-9][.,][\s\S])"  # ... nor to a `+` (a phone number starts at its `+`)
_NA = r"(?![0-9A-Za-z])"  # a number ends here
_SEP = r"[ ]{0,3}+[-.]?+[ ]{0,3}+"  # between a number's groups: -, ., spaces, " - " (possessive: never re-tried)
_AREA = r"(?:1[016789]|2|[3-6][1-5]|70|50[2-8])"
_INTL = (_SEP + r"(?:\(0\)" + _SEP + r")?(?:\(0?" + _AREA + r"\)|0?" + _AREA + r")"  # +82 (0)2 / +82 (10) / +82 010
         + _SEP + r"[0-9]{3,4}" + _SEP + r"[0-9]{4}" + _NA)
_DOM = _SEP + r"[0-9]{3,4}" + _SEP + r"[0-9]{4}" + _NA
_PHONE = re.compile(
    r"\(" + _B_PLUS + r"(?:[ ]?\+?[ ]?82[ ]?\)" + _INTL + r"|0" + _AREA + r"\)" + _DOM + r")"  # (+82) 10 / (02) 345
    r"|\+" + _B_PLUS + r"[ ]?82" + _INTL  # +82 10 / +82-2
    + r"|0" + _B_PLUS + r"(?:0[ ]?82" + _INTL + r"|" + _AREA + r"\)?" + _DOM + r")"  # 0082-10 / 010 / 02)
    + r"|8" + _B_PLUS + r"2(?=[ .\-])" + _INTL)  # 82-10 (82 without + or 00 needs a separator)
# a digit run: groups of 3+ digits joined by one separator (up to 3 spaces, or `-`/`.` with up to 3 spaces on each side),
# or one group of 13+. RRNs and cards are both read from these runs (one scan for both). Possessive, and no lookahead
# at the end (a run glued to a letter loses its last group in _number_spans), so no run is ever re-read.
_RUN = re.compile(r"[0-9]" + _B + r"(?:[0-9]{2,}+(?:(?:[ ]{1,3}|[ ]{0,3}[-.][ ]{0,3})[0-9]{3,}+)++|[0-9]{12,}+)")
_GROUP = re.compile(r"[0-9]++")
_DIGIT = re.compile(r"[0-9]")
# e-mail: found from its `@` (the domain, up to a top-level label of 2+ letters: the label repetition may give back
# labels, but a domain's labels hold no `@`, so each `@` reads only its own), the local part read backwards from it
_LABEL = r"(?:[A-Za-z0-9\-]++|[\uac00-\ud7a30-9\-]++)"  # an ASCII or a Hangul domain label
_AT = re.compile(r"@[ ]?(?:" + _LABEL + r"\.)+(?:[A-Za-z]{2,}+|[\uac00-\ud7a3]{2,}+)(?![A-Za-z0-9\-])")
_LOCAL_CHARS = "._%+-"  # with letters and digits of any script
_CENTURY = {"1": 1900, "2": 1900, "5": 1900, "6": 1900, "3": 2000, "4": 2000, "7": 2000, "8": 2000,
            "9": 1800, "0": 1800}
_DOUBLE = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: a doubled digit's digit sum


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
        total += _DOUBLE[int(ch)] if i % 2 else int(ch)
    return total % 10 == 0


# ------------------------------------------------------------------------------------------------ finders
# Each returns (start, end) spans of the view that are PII of its kind.

def _email_spans(view: str) -> list[tuple[int, int]]:
    out = []
    for m in _AT.finditer(view):
        # the local part, read backwards from the `@` (one space allowed before it), at most 64 characters
        # (RFC 5321); a plain loop: a regex searched over the window would try each of its 65 starts
        end = m.start() - 1 if m.start() and view[m.start() - 1] == " " else m.start()
        start, stop = end, max(0, end - 64)
        while start > stop and (view[start - 1].isalnum() or view[start - 1] in _LOCAL_CHARS):
            start -= 1
        if view[start:end].strip("."):
            out.append((start, m.end()))
    return out


# Long texts are scanned only where a number can be (_regions): on 1 MB of `+82 ` or `1-1-1-` every character is a
# place a pattern starts at and fails, ~100 ns each in the regex engine; numpy finds the digit runs in a few ms.
_PREFILTER_FROM = 4096  # characters; shorter texts are scanned whole (numpy's call overhead is more than the scan)
_PHONE_REACH = 80  # a phone match is at most ~55 characters long and ends at the end of a run of 4+ digits
_RUN_GAP = 7  # at most this many characters between two groups of one run (`[ ]{0,3}[-.][ ]{0,3}`)


def _digit_runs(view: str, min_len: int):
    """(starts, ends) of the maximal runs of ASCII digits of at least `min_len` digits."""
    import numpy as np

    arr = (np.frombuffer(view.encode("ascii"), dtype=np.uint8) if view.isascii()
           else np.frombuffer(view.encode("utf-32-le"), dtype=np.uint32))
    digit = (arr - arr.dtype.type(48)) < 10  # unsigned: everything below '0' wraps around to a large number
    change = np.flatnonzero(digit[1:] != digit[:-1]) + 1
    starts = change[digit[change]]
    ends = change[~digit[change]]
    if len(digit) and digit[0]:
        starts = np.concatenate(([0], starts))
    if len(digit) and digit[-1]:
        ends = np.concatenate((ends, [len(digit)]))
    keep = ends - starts >= min_len
    return starts[keep], ends[keep]


def _regions(starts, ends, before: int, gap: int, size: int) -> list[tuple[int, int]]:
    """[start - before, end + 1) around each run, merged where they come within `gap` of each other: a scan of each
    region finds exactly the matches a scan of the whole text finds, when every match lies within one run's reach
    (`before` characters before it) and ends at a run's end (the +1 leaves the character after it to a lookahead)."""
    import numpy as np

    if not len(starts):
        return []
    a, b = np.maximum(starts - before, 0), np.minimum(ends + 1, size)
    cut = np.flatnonzero(a[1:] > b[:-1] + gap)  # runs are in order and apart, so b only grows
    return list(zip(a[np.concatenate(([0], cut + 1))].tolist(), b[np.concatenate((cut, [len(b) - 1]))].tolist()))


def _phone_spans(view: str) -> list[tuple[int, int]]:
    if len(view) < _PREFILTER_FROM:
        return [m.span() for m in _PHONE.finditer(view)]
    starts, ends = _digit_runs(view, 4)  # every phone number ends with 4 digits and no digit after them
    return [m.span() for a, b in _regions(starts, ends, _PHONE_REACH, 0, len(view))
            for m in _PHONE.finditer(view, a, b)]


def _groups(run: str) -> list[tuple[int, int]]:
    return [g.span() for g in _GROUP.finditer(run)]


def _rrns_in_run(run: str, groups: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """RRNs of one run: a group of 13 digits, or a group of 6 then one of 7 split by spaces or a hyphen (not a dot),
    whose date exists (is_rrn)."""
    out = []
    for i, (a, b) in enumerate(groups):
        if b - a == 13:
            d, end = run[a:b], b
        elif b - a == 6 and i + 1 < len(groups) and groups[i + 1][1] - groups[i + 1][0] == 7 \
                and "." not in run[b:groups[i + 1][0]]:
            d, end = run[a:b] + run[groups[i + 1][0]:groups[i + 1][1]], groups[i + 1][1]
        else:
            continue
        if is_rrn(d[0:2], d[2:4], d[4:6], d[6]):
            out.append((a, end))
    return out


def _rrns_in_long_run(run: str) -> list[tuple[int, int]]:
    """_rrns_in_run for a long run: numpy picks the groups of 13 and the 6-then-7 pairs; only those are checked."""
    import numpy as np

    chars = np.frombuffer(run.encode("ascii"), dtype=np.uint8)
    digit = (chars >= 48) & (chars <= 57)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], digit, [False]]).astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]  # every group's [start, end) in the run
    lens = ends - starts
    out = []
    for g in np.flatnonzero(lens == 13).tolist():
        a = int(starts[g])
        if is_rrn(run[a:a + 2], run[a + 2:a + 4], run[a + 4:a + 6], run[a + 6]):
            out.append((a, a + 13))
    for g in np.flatnonzero((lens[:-1] == 6) & (lens[1:] == 7)).tolist():
        a, b, c = int(starts[g]), int(ends[g]), int(starts[g + 1])
        if "." not in run[b:c] and is_rrn(run[a:a + 2], run[a + 2:a + 4], run[a + 4:a + 6], run[c]):
            out.append((a, c + 7))
    return sorted(out)


def _card_windows_small(run: str) -> list[tuple[int, int]]:
    """The card windows of a short run, in plain Python (numpy's call overhead is larger than the work here): the same
    candidates and prefix sums as _card_windows_numpy. (start, end) in `run`."""
    pos = [i for i, ch in enumerate(run) if "0" <= ch <= "9"]
    n = len(pos)
    bounds = [0] + [k for k in range(1, n) if pos[k] != pos[k - 1] + 1] + [n]
    plain, double = [[0] * (n + 1), [0] * (n + 1)], [[0] * (n + 1), [0] * (n + 1)]
    for k, p in enumerate(pos):
        dig, odd = ord(run[p]) - 48, k % 2
        plain[odd][k + 1], plain[1 - odd][k + 1] = plain[odd][k] + dig, plain[1 - odd][k]
        double[odd][k + 1], double[1 - odd][k + 1] = double[odd][k] + _DOUBLE[dig], double[1 - odd][k]
    cands = []
    for g in range(len(bounds) - 1):  # inside one group
        lo, hi = bounds[g], bounds[g + 1]
        cands += [(i, i + k) for k in range(13, min(19, hi - lo) + 1) for i in range(lo, hi - k + 1)]
    for g in range(len(bounds) - 1):  # whole groups g .. g+t
        for t in range(1, 7):
            if g + t + 1 < len(bounds) and 13 <= bounds[g + t + 1] - bounds[g] <= 19:
                cands.append((bounds[g], bounds[g + t + 1]))
    hits = []
    for s, e in cands:
        q = (e - 1) % 2  # the check digit's parity: it and every second digit to its left count plain
        if (plain[q][e] - plain[q][s] + double[1 - q][e] - double[1 - q][s]) % 10 == 0:
            hits.append((pos[s], pos[e - 1] + 1))
    return hits


def _card_windows_numpy(run: str, exclude: list[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """The same windows for a long run, as merged spans (what _merge(_card_windows_small(run)) gives), leaving out
    windows that overlap a span of `exclude` (the run's RRNs). All at once in numpy, without listing windows (a run
    of zeros has a passing window at every place):
      - Luhn's sum of a window is a difference of prefix sums: c0 counts the digits as Luhn does when the check digit
        sits at an even place (odd places doubled), c1 the other way round; the difference is 0 mod 10 exactly when
        the two prefix sums are equal mod 10, so each window length is a comparison of two byte arrays (slices);
      - the digits covered by passing windows: +1 where each passing window starts and -1 where it ends, summed
        over all lengths; a digit is covered where the running sum is positive;
      - windows inside one group are looked for only when a group is as long as a card (13 digits), and with two
        strided comparisons per length (the check digit's parity alternates with the start)."""
    import numpy as np

    chars = np.frombuffer(run.encode("ascii"), dtype=np.uint8)
    pos = np.flatnonzero((chars >= 48) & (chars <= 57))  # the digits' places in the run
    d = chars[pos] - 48
    n = len(d)
    dbl = np.asarray(_DOUBLE, dtype=np.uint8)[d]
    plain_even, plain_odd = d.copy(), dbl.copy()  # Luhn's counts with the check digit at an even / odd place
    plain_even[1::2] = dbl[1::2]
    plain_odd[1::2] = d[1::2]
    zero = np.zeros(1, dtype=np.uint8)
    c0 = np.concatenate([zero, (np.cumsum(plain_even, dtype=np.int32) % 10).astype(np.uint8)])
    c1 = np.concatenate([zero, (np.cumsum(plain_odd, dtype=np.int32) % 10).astype(np.uint8)])
    even_end = np.zeros(n, dtype=bool)
    even_end[::2] = True
    gaps = np.flatnonzero(np.diff(pos) > 1) + 1  # digit index where each group after the first starts
    bounds = np.concatenate([[0], gaps, [n]])
    blocked = None  # running count of digits inside an excluded span
    if len(exclude):
        ex = np.asarray(exclude, dtype=np.int64)
        lo, hi = np.searchsorted(pos, ex[:, 0]), np.searchsorted(pos, ex[:, 1])  # digit indices of each span
        inside = np.cumsum(np.bincount(lo, minlength=n + 1) - np.bincount(hi, minlength=n + 1))[:n] > 0
        blocked = np.concatenate([[0], np.cumsum(inside, dtype=np.int32)])
    sizes = np.diff(bounds)
    covered = np.zeros(n, dtype=bool)
    if sizes.max() >= 13:  # windows inside one group (none when every group is shorter than a card)
        # rem[s]: digits from s to the end of its group (a window of length k starting at s stays inside: rem >= k)
        rem = None if len(gaps) == 0 else np.repeat(bounds[1:], sizes) - np.arange(n)
        cover = np.zeros(n + 1, dtype=np.int32)  # +1 where a passing window starts, -1 where it ends
        for k in range(13, 20):
            if n < k:
                break
            m = n - k + 1
            # the check digit s+k-1 sits at an even place when s has the parity of k-1: compare c0 there, c1 elsewhere
            # (two strided comparisons instead of both everywhere and a select)
            ok = np.empty(m, dtype=bool)
            a, b = (k - 1) % 2, k % 2
            ok[a::2] = c0[k + a::2] == c0[a:m:2]
            ok[b::2] = c1[k + b::2] == c1[b:m:2]
            if rem is not None:
                ok &= rem[:m] >= k
            if blocked is not None:
                ok &= blocked[k:] == blocked[:m]
            cover[:m] += ok
            cover[k:] -= ok
        covered = np.cumsum(cover[:n], dtype=np.int32) > 0
    spans = []
    if covered.any():  # covered digits -> spans of the run, split where a group ends
        edge = np.diff(np.concatenate([[0], covered.astype(np.int8), [0]]))
        first, last = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
        if len(gaps):  # windows stay inside one group: a covered stretch across two groups is two spans
            cuts = gaps[covered[gaps - 1] & covered[gaps]]
            first, last = np.sort(np.concatenate([first, cuts])), np.sort(np.concatenate([last, cuts]))
        spans = list(zip(pos[first].tolist(), (pos[last - 1] + 1).tolist()))
    for t in range(1, 7):  # windows of whole groups g .. g+t
        if len(bounds) - 1 - t <= 0:
            break
        s, e = bounds[:-(t + 1)], bounds[t + 1:]
        keep = (e - s >= 13) & (e - s <= 19)
        s, e = s[keep], e[keep]
        ok = np.where(even_end[e - 1], c0[e] == c0[s], c1[e] == c1[s])
        if blocked is not None:
            ok &= blocked[e] == blocked[s]
        spans += list(zip(pos[s[ok]].tolist(), (pos[e[ok] - 1] + 1).tolist()))
    return _merge(spans)


def _number_spans(view: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(RRN spans, card spans) of the view, from one scan of its digit runs. An RRN wins over a card window that
    overlaps it."""
    rrns, cards = [], []
    if len(view) < _PREFILTER_FROM:
        matches = _RUN.finditer(view)
    else:  # a run starts with a group of 3+ digits, and its next groups (3+ digits too) are at most _RUN_GAP away
        starts, ends = _digit_runs(view, 3)
        matches = (m for a, b in _regions(starts, ends, 0, _RUN_GAP, len(view)) for m in _RUN.finditer(view, a, b))
    for m in matches:
        run, at = m[0], m.start()
        if m.end() < len(view) and view[m.end()].isascii() and view[m.end()].isalnum():
            # glued to an ASCII letter or digit: its last group is not a number; the groups before it still are
            last = _GROUP.search(run[::-1])
            run = run[:len(run) - last.end()].rstrip(" -.") if last else ""
        if len(run) < 13:
            continue
        if len(run) <= 64:
            found, hits = _rrns_in_run(run, _groups(run)), _card_windows_small(run)
            if found:
                hits = [(a, b) for a, b in hits if not any(a < y and x < b for x, y in found)]
            merged = _merge(hits)
        else:  # merged by _covered, RRN overlaps left out there
            found = _rrns_in_long_run(run)
            merged = _card_windows_numpy(run, found)
        rrns += [(at + a, at + b) for a, b in found]
        cards += [(at + a, at + b) for a, b in merged]
    return rrns, cards


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _blank(view: str, spans: list[tuple[int, int]]) -> str:
    """The view with the spans already taken hidden (NUL: neither a digit, a letter nor a separator)."""
    parts, at = [], 0
    for a, b in spans:
        parts += [view[at:a], "\0" * (b - a)]
        at = b
    parts.append(view[at:])
    return "".join(parts)


def _spans(text: str) -> list[tuple[int, int, str]]:
    """Every PII span of `text`, kind by kind in masking order (e-mail, then RRN and card, then phone; a span taken by
    an earlier kind is hidden from the later ones), sorted by position."""
    view = _view(text)
    found: list[tuple[int, int, str]] = []
    if "@" in view:
        spans = _email_spans(view)
        found += [(a, b, "email") for a, b in spans]
        view = _blank(view, spans)
    if _DIGIT.search(view) is None:
        return sorted(found)
    rrns, cards = _number_spans(view)
    found += [(a, b, "rrn") for a, b in rrns] + [(a, b, "card") for a, b in cards]
    view = _blank(view, sorted(rrns + cards))
    found += [(a, b, "phone") for a, b in _phone_spans(view)]
    return sorted(found)


def mask_pii(text: str, counts: Optional[Counter] = None) -> str:
    """`text` with every e-mail, RRN, card and phone number replaced by its placeholder; `counts[kind]` += found.
    A text without PII comes back as it was, character for character."""
    if not text:
        return text
    found = _spans(text)
    if not found:
        return text
    parts, at = [], 0
    for a, b, kind in found:
        parts += [text[at:a], PLACEHOLDERS[kind]]
        at = b
        if counts is not None:
            counts[kind] += 1
    parts.append(text[at:])
    return "".join(parts)


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, original text) of every PII value the masker would replace, in the order of the text: what tests and
    audits look for."""
    if not text:
        return []
    return [(kind, text[a:b]) for a, b, kind in _spans(text)]
