"""IMAP command syntax: tokens, sequence sets, FETCH items, SEARCH keys, dates.

Twisted parses each argument separately (``arg_astring``, ``arg_seqset``,
``_FetchParser``, ``parseNestedParens``), with holes the server must not
inherit: ``MessageSet`` iterates every number of ``1:4294967295``, negative
literal sizes are accepted, nesting is unbounded (a deep SEARCH answers
"maximum recursion depth exceeded") and parse errors carry exception texts to
the client. Here a whole command (its literals already read) is tokenized
once, with a depth cap, and every error is a ``SyntaxError_`` with a fixed,
client-safe text.
"""

import bisect
import calendar
import re
import time
from collections import namedtuple

MAX_DEPTH = 16              # nested parentheses in one command
MAX_TOKENS = 20000          # tokens in one command
MAX_SET_RANGES = 5000       # ranges in one sequence set

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {m.lower(): i + 1 for i, m in enumerate(MONTHS)}


class SyntaxError_(Exception):
    """A malformed command: answered ``BAD`` with this (fixed) text."""


class Atom(bytes):
    """An unquoted token (may hold ``[...]`` sections: ``BODY[HEADER.FIELDS (A)]``)."""


class String(bytes):
    """A quoted string or a small literal."""


class BigLiteral:
    """A literal too large to keep in memory as a token (APPEND's message)."""

    def __init__(self, data):
        self.data = data            # a file object or bytes


# -- tokens ----------------------------------------------------------------------------

_ATOM_END = frozenset(b' ()"{')


def tokenize(segments):
    """The tokens of a command: ``segments`` alternate line text (bytes) and
    literal payloads (String / BigLiteral) in the order they arrived.

    Returns a list of Atom, String, BigLiteral and nested lists (parentheses).
    """
    stack = [[]]
    count = 0
    for segment in segments:
        if not isinstance(segment, (bytes, bytearray)) or isinstance(segment, String):
            stack[-1].append(segment)
            count += 1
            continue
        count = _tokenize_text(bytes(segment), stack, count)
    if len(stack) != 1:
        raise SyntaxError_("Unbalanced parentheses")
    return stack[0]


def _tokenize_text(text, stack, count):
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
            continue
        count += 1
        if count > MAX_TOKENS:
            raise SyntaxError_("Command has too many parts")
        if c == 0x28:                       # (
            if len(stack) > MAX_DEPTH:
                raise SyntaxError_("Nesting too deep")
            stack.append([])
            i += 1
        elif c == 0x29:                     # )
            if len(stack) == 1:
                raise SyntaxError_("Unbalanced parentheses")
            inner = stack.pop()
            stack[-1].append(inner)
            i += 1
        elif c == 0x22:                     # "
            i = _quoted(text, i, stack[-1])
        elif c == 0x7B:                     # { a literal marker left in the text
            raise SyntaxError_("Misplaced literal")
        else:
            i = _atom(text, i, stack[-1])
    return count


def _quoted(text, i, out):
    value = bytearray()
    i += 1
    while i < len(text):
        c = text[i]
        if c == 0x5C:                       # backslash: only \" and \\ are allowed
            if i + 1 >= len(text) or text[i + 1] not in (0x22, 0x5C):
                raise SyntaxError_("Bad escape in quoted string")
            value.append(text[i + 1])
            i += 2
            continue
        if c == 0x22:
            out.append(String(bytes(value)))
            return i + 1
        if c in (0x0D, 0x0A, 0x00):
            break
        value.append(c)
        i += 1
    raise SyntaxError_("Unterminated quoted string")


def _atom(text, i, out):
    start = i
    depth = 0
    while i < len(text):
        c = text[i]
        if c == 0x5B:                       # [ ... ] may hold spaces and parentheses
            depth += 1
        elif c == 0x5D and depth:
            depth -= 1
        elif depth == 0 and c in _ATOM_END:
            break
        elif c < 0x20 or c == 0x7F:
            raise SyntaxError_("Control character in command")
        i += 1
    if depth:
        raise SyntaxError_("Unbalanced brackets")
    out.append(Atom(text[start:i]))
    return i


def is_string(token):
    """Atoms and strings both serve as astrings."""
    return isinstance(token, (Atom, String))


# -- sequence sets -----------------------------------------------------------------------

_SET = re.compile(rb"(?:\d+|\*)(?::(?:\d+|\*))?(?:,(?:\d+|\*)(?::(?:\d+|\*))?)*\Z")
MAX_NUMBER = 2 ** 32 - 1


def parse_set(token):
    """A sequence set -> list of (low, high) with None for ``*``; never expanded."""
    if not isinstance(token, (Atom, String)) or not _SET.match(token):
        raise SyntaxError_("Invalid sequence set")
    ranges = []
    for piece in token.split(b","):
        low, _, high = piece.partition(b":")
        values = [None if v == b"*" else int(v) for v in (low, high or low)]
        for v in values:
            if v is not None and not 0 < v <= MAX_NUMBER:
                raise SyntaxError_("Invalid sequence number")
        ranges.append(tuple(values))
        if len(ranges) > MAX_SET_RANGES:
            raise SyntaxError_("Sequence set too long")
    return ranges


def is_set(token):
    return isinstance(token, Atom) and bool(_SET.match(token))


def bounds(ranges, top):
    """Each range of a set as ``(low, high)``, ``*`` (None) read as ``top``
    and the ends in order (``5:2`` is ``2:5``, RFC 3501 §9)."""
    for low, high in ranges:
        low = top if low is None else low
        high = top if high is None else high
        yield (high, low) if low > high else (low, high)


def resolve_seqs(ranges, count):
    """Sequence numbers (sorted, unique) selected by ``ranges`` in a mailbox of
    ``count`` messages; ValueError if one is beyond it. Work is bounded by
    ``count``, not by the numbers in the set."""
    chosen = set()
    for low, high in bounds(ranges, count):
        if low < 1 or high > count:
            raise ValueError("no such message")
        if high - low + 1 >= count:
            return list(range(1, count + 1))
        chosen.update(range(low, high + 1))
    return sorted(chosen)


def resolve_uids(ranges, uids):
    """Indexes into the sorted list ``uids`` selected by UID ``ranges``.

    ``*`` is the highest UID; a range ``n:*`` always includes it, even when n
    is above it (RFC 3501 §6.4.8). Bisection keeps ``1:4294967295`` cheap.
    """
    if not uids:
        return []
    top = uids[-1]
    chosen = set()
    for low, high in bounds(ranges, top):
        start = bisect.bisect_left(uids, low)
        end = bisect.bisect_right(uids, high)
        if end - start == len(uids):
            return list(range(len(uids)))
        chosen.update(range(start, end))
    return sorted(chosen)


# -- FETCH items ---------------------------------------------------------------------------

FetchItem = namedtuple("FetchItem", "name peek numbers kind fields partial")
FetchItem.__doc__ = """One FETCH attribute. ``name`` is ENVELOPE, FLAGS, INTERNALDATE,
RFC822, RFC822.HEADER, RFC822.SIZE, RFC822.TEXT, BODY, BODYSTRUCTURE, UID or
BODY[] (a section: ``numbers`` like (1, 2), ``kind`` "", HEADER, HEADER.FIELDS,
HEADER.FIELDS.NOT, TEXT or MIME, ``fields`` for the header lists, ``partial``
(start, length) or None)."""

_SIMPLE = {b"ENVELOPE", b"FLAGS", b"INTERNALDATE", b"RFC822", b"RFC822.HEADER",
           b"RFC822.SIZE", b"RFC822.TEXT", b"BODY", b"BODYSTRUCTURE", b"UID"}
_MACROS = {
    b"ALL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE"),
    b"FAST": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"),
    b"FULL": (b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE", b"ENVELOPE", b"BODY"),
}
_BODY_ITEM = re.compile(rb"(BODY(?:\.PEEK)?)\[([^\]]*)\](?:<(\d{1,10})\.(\d{1,10})>)?\Z", re.I)
_SECTION = re.compile(
    rb"((?:[1-9]\d{0,8})(?:\.[1-9]\d{0,8})*)?"
    rb"(?:(?(1)\.)(HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME))?"
    rb"(?: \(([^()]*)\))?\Z", re.I)


def parse_fetch_items(tokens):
    """The FETCH items of ``tokens`` (a macro, one item or a list of items)."""
    if len(tokens) != 1:
        raise SyntaxError_("Invalid FETCH items")
    token = tokens[0]
    if isinstance(token, Atom) and token.upper() in _MACROS:
        return [_simple(name) for name in _MACROS[token.upper()]]
    items = token if isinstance(token, list) else [token]
    if not items:
        raise SyntaxError_("Invalid FETCH items")
    return [_fetch_item(item) for item in items]


def _simple(name):
    return FetchItem(name.decode("ascii"), False, (), "", (), None)


def _fetch_item(token):
    if not isinstance(token, Atom):
        raise SyntaxError_("Invalid FETCH item")
    upper = token.upper()
    if upper in _SIMPLE:
        return _simple(upper)
    m = _BODY_ITEM.match(token)
    section = _SECTION.match(m.group(2)) if m else None
    if section is None:
        raise SyntaxError_("Invalid FETCH item")
    name, _, start, length = m.groups()
    numbers, kind, fields = section.groups()
    numbers = tuple(int(n) for n in numbers.split(b".")) if numbers else ()
    kind = (kind or b"").upper().decode("ascii")
    if kind == "MIME" and not numbers:
        raise SyntaxError_("MIME needs a part number")
    header_list = ()
    if kind in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        if fields is None:
            raise SyntaxError_("Missing header list")
        header_list = tuple(_header_names(fields))
    elif fields is not None:
        raise SyntaxError_("Invalid section")
    partial = None
    if start is not None:
        if int(length) == 0:
            raise SyntaxError_("Invalid partial")
        partial = (int(start), int(length))
    return FetchItem("BODY[]", name.upper() == b"BODY.PEEK", numbers, kind, header_list, partial)


def _header_names(text):
    names = []
    for token in tokenize([text]):
        if not is_string(token) or not token or not re.match(rb"[\x21-\x39\x3b-\x7e]+\Z", token):
            raise SyntaxError_("Invalid header list")
        names.append(bytes(token).lower())
    if not names:
        raise SyntaxError_("Empty header list")
    return names


def section_name(item, length=None):
    """How a BODY[] item is named in the response (``BODY[1.HEADER]<0>``)."""
    parts = [".".join(str(n) for n in item.numbers)] if item.numbers else []
    if item.kind:
        parts.append(item.kind)
    text = ".".join(parts).encode("ascii")
    if item.fields:
        text += b" (" + b" ".join(f.upper() for f in item.fields) + b")"
    out = b"BODY[" + text + b"]"
    if item.partial is not None:
        out += b"<%d>" % item.partial[0]
    return out


# -- dates --------------------------------------------------------------------------------

_DATE = re.compile(rb"(\d{1,2})-([A-Za-z]{3})-(\d{4})\Z")
_DATE_TIME = re.compile(
    rb" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})\Z")


def parse_date(token):
    """A SEARCH date (``1-Feb-1994``) -> (year, month, day)."""
    m = _DATE.match(bytes(token)) if is_string(token) else None
    if not m or m.group(2).lower().decode() not in _MONTH_NUMBER:
        raise SyntaxError_("Invalid date")
    day, month, year = int(m.group(1)), _MONTH_NUMBER[m.group(2).lower().decode()], int(m.group(3))
    if not 1 <= day <= 31:
        raise SyntaxError_("Invalid date")
    return year, month, day


def parse_date_time(token):
    """An APPEND date-time (``"17-Jul-1996 02:44:25 -0700"``) -> Unix time."""
    m = _DATE_TIME.match(bytes(token)) if isinstance(token, String) else None
    if not m or m.group(2).lower().decode() not in _MONTH_NUMBER:
        raise SyntaxError_("Invalid date-time")
    day, year = int(m.group(1)), int(m.group(3))
    hour, minute, second = int(m.group(4)), int(m.group(5)), int(m.group(6))
    if not (1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise SyntaxError_("Invalid date-time")
    offset = (int(m.group(8)) * 60 + int(m.group(9))) * 60
    if m.group(7) == b"-":
        offset = -offset
    month = _MONTH_NUMBER[m.group(2).lower().decode()]
    try:
        return calendar.timegm((year, month, day, hour, minute, second)) - offset
    except (ValueError, OverflowError):
        raise SyntaxError_("Invalid date-time") from None


def format_internaldate(timestamp):
    """INTERNALDATE as ``"17-Jul-1996 02:44:25 +0000"`` (UTC, locale-free)."""
    t = time.gmtime(max(0, int(timestamp)))
    return b'"%02d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
