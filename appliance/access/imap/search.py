"""IMAP SEARCH: search keys compiled to a predicate over one message.

Stock Twisted evaluates the key list recursively per message, deep-copying
the query each time, and a deep ``NOT NOT ... ALL`` or ``((((...))))`` ends
in "maximum recursion depth exceeded" sent to the client (T20). Here keys are
parsed once into a tree of small functions, with the depth bounded, and the
compiled query says what it needs (flags only, the header, or the whole
message) so the mailbox reads no more than that.
"""

import bisect
import calendar
import email.errors
import email.header
import email.utils

from appliance.access.imap import mime as imapmime
from appliance.access.msgcache import SEARCH_FIELDS

from appliance.access.imap.syntax import (SyntaxError_, bounds, is_set, is_string, parse_date,
                                         parse_set)

MAX_DEPTH = 64
CHARSETS = ("US-ASCII", "UTF-8")

FLAGS, HEADER, BODY = 0, 1, 2      # what a query needs, in increasing cost

_FLAG_KEYS = {
    b"ANSWERED": ("\\answered", True), b"DELETED": ("\\deleted", True),
    b"DRAFT": ("\\draft", True), b"FLAGGED": ("\\flagged", True), b"SEEN": ("\\seen", True),
    b"UNANSWERED": ("\\answered", False), b"UNDELETED": ("\\deleted", False),
    b"UNDRAFT": ("\\draft", False), b"UNFLAGGED": ("\\flagged", False),
    b"UNSEEN": ("\\seen", False),
}
_ADDRESS_KEYS = {b"BCC": "bcc", b"CC": "cc", b"FROM": "from", b"TO": "to", b"SUBJECT": "subject"}


_SEARCH_POSITION = {name: position for position, name in enumerate(SEARCH_FIELDS)}


class Candidate:
    """One message as a query sees it. Flags, the header and the text are
    loaded on first use (on the searching thread), so a query reads no more
    than it needs; decoded header fields come from the folder's message cache
    when an earlier FETCH ENVELOPE left them there."""

    __slots__ = ("seq", "uid", "message", "recent", "folder", "_flags", "_headers", "_raw")

    def __init__(self, seq, message, recent, folder):
        self.seq = seq
        self.uid = message.uid
        self.message = message
        self.recent = recent
        self.folder = folder
        self._flags = self._headers = self._raw = None

    @property
    def flags(self):
        """Lower-case IMAP flags."""
        if self._flags is None:
            self._flags = {f.lower() for f in self.folder.flags_of(self.message)}
        return self._flags

    @property
    def size(self):
        return self.message.size

    @property
    def internaldate(self):
        return self.message.mtime

    @property
    def headers(self):
        if self._headers is None:
            self._headers = imapmime.Headers(self.folder.read_header_sync(self.message))
        return self._headers

    @property
    def raw(self):
        if self._raw is None:
            self._raw = self.folder.read_sync(self.message)
        return self._raw

    def header_values(self, name):
        """Decoded, case-folded values of the fields called ``name`` (bytes)."""
        position = _SEARCH_POSITION.get(name)
        if position is not None:
            message = self.message
            cached = self.folder.cache.get(message.base, message.size)
            if cached is not None:
                return cached[1][position]
            fields = search_fields(self.headers)
            self.folder.cache.put(message.base, message.size, None, fields)
            return fields[position]
        return _decoded_values(self.headers, name)


def search_fields(headers):
    """The decoded values SEARCH FROM/TO/CC/BCC/SUBJECT look at: a tuple
    (in ``SEARCH_FIELDS`` order) of tuples of text."""
    found = [() for _ in SEARCH_FIELDS]
    for field, raw in headers.fields:
        position = _SEARCH_POSITION.get(field)
        if position is not None:
            found[position] += (decode_header_text(imapmime.field_value(raw)),)
    return tuple(found)


def _decoded_values(headers, name):
    return tuple(decode_header_text(imapmime.field_value(raw))
                 for field, raw in headers.fields if field == name)


class Query:
    """A compiled SEARCH. ``view_uids`` is the session's UID list (for ``*``
    and sequence sets); ``charset`` the CHARSET argument (None = US-ASCII)."""

    def __init__(self, tokens, view_uids, charset=None):
        if charset is not None and charset.upper() not in CHARSETS:
            raise UnknownCharset(charset)
        self.view_uids = view_uids
        self.needs = FLAGS
        self.cost = 0               # keys in the query: the work per message
        self._seq_cache = {}
        if not tokens:
            raise SyntaxError_("Missing search keys")
        parts = []
        rest = list(reversed(tokens))   # taken from the end: pop() is O(1), pop(0) O(n)
        while rest:
            parts.append(self._key(rest, 0))
        self.match = _all_of(parts)

    def _need(self, level):
        self.needs = max(self.needs, level)

    def _key(self, rest, depth):
        if depth > MAX_DEPTH:
            raise SyntaxError_("Search keys nested too deep")
        if not rest:                # OR / NOT without their operands
            raise SyntaxError_("Missing search key")
        token = rest.pop()
        self.cost += 1
        if isinstance(token, list):
            if not token:
                raise SyntaxError_("Empty search list")
            inner = list(reversed(token))
            parts = []
            while inner:
                parts.append(self._key(inner, depth + 1))
            return _all_of(parts)
        if not is_string(token):
            raise SyntaxError_("Invalid search key")
        if is_set(token):
            return self._sequence(token)
        key = bytes(token).upper()
        if key == b"ALL":
            return lambda c: True
        if key in _FLAG_KEYS:
            flag, wanted = _FLAG_KEYS[key]
            return lambda c: (flag in c.flags) == wanted
        if key in (b"RECENT", b"OLD", b"NEW"):
            return {b"RECENT": lambda c: c.recent, b"OLD": lambda c: not c.recent,
                    b"NEW": lambda c: c.recent and "\\seen" not in c.flags}[key]
        if key in (b"KEYWORD", b"UNKEYWORD"):
            flag = self._string(rest).lower()
            wanted = key == b"KEYWORD"
            return lambda c: (flag in c.flags) == wanted
        if key == b"NOT":
            inner = self._key(rest, depth + 1)
            return lambda c: not inner(c)
        if key == b"OR":
            one = self._key(rest, depth + 1)
            other = self._key(rest, depth + 1)
            return lambda c: one(c) or other(c)
        if key in (b"LARGER", b"SMALLER"):
            number = self._number(rest)
            if key == b"LARGER":
                return lambda c: c.size > number
            return lambda c: c.size < number
        if key == b"UID":
            return self._uid_set(rest)
        if key in (b"BEFORE", b"ON", b"SINCE"):
            day = _day_number(*parse_date(self._take(rest)))
            return _compare(key, lambda c: _day_of_timestamp(c.internaldate), day)
        if key in (b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
            day = _day_number(*parse_date(self._take(rest)))
            self._need(HEADER)
            return _compare(key[4:], _sent_day, day)
        if key in _ADDRESS_KEYS:
            name, needle = _ADDRESS_KEYS[key].encode("ascii"), self._text(rest)
            self._need(HEADER)
            return lambda c: any(needle in value for value in c.header_values(name))
        if key == b"HEADER":
            name = self._string(rest).lower().encode("utf-8")
            needle = self._text(rest)
            self._need(HEADER)
            return lambda c: any(needle in value for value in c.header_values(name))
        if key in (b"BODY", b"TEXT"):
            needle = self._text(rest)
            self._need(BODY)
            if key == b"BODY":
                return lambda c: needle in _body_text(c)
            return lambda c: needle in _body_text(c) or needle in _header_text(c)
        raise SyntaxError_("Unknown search key")

    def _take(self, rest):
        if not rest:
            raise SyntaxError_("Missing search argument")
        return rest.pop()

    def _string(self, rest):
        token = self._take(rest)
        if not is_string(token):
            raise SyntaxError_("Invalid search argument")
        try:
            return bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            raise SyntaxError_("Search string is not UTF-8") from None

    def _text(self, rest):
        return self._string(rest).casefold()

    def _number(self, rest):
        token = self._take(rest)
        if not is_string(token) or not bytes(token).isdigit() or len(token) > 10:
            raise SyntaxError_("Invalid number")
        return int(token)

    def _sequence(self, token):
        count = len(self.view_uids)
        chosen = Intervals((max(low, 1), min(high, count)) for low, high in
                           bounds(parse_set(token), count))
        return lambda c: c.seq in chosen

    def _uid_set(self, rest):
        token = self._take(rest)
        if not is_set(token):
            raise SyntaxError_("Invalid UID set")
        top = self.view_uids[-1] if self.view_uids else 0
        chosen = Intervals(bounds(parse_set(token), top))
        return lambda c: c.uid in chosen


class UnknownCharset(Exception):
    """SEARCH CHARSET we do not support: ``NO [BADCHARSET (...)]``."""


class Intervals:
    """Membership in a union of closed intervals, by bisection: a key's
    sequence or UID set is never expanded into the numbers it names (one
    ``1:*`` per key, thousands of keys, was a set per key of every message)."""

    def __init__(self, pairs):
        merged = []
        for low, high in sorted(p for p in pairs if p[0] <= p[1]):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.lows = [low for low, _ in merged]
        self.highs = [high for _, high in merged]

    def __contains__(self, number):
        index = bisect.bisect_right(self.lows, number) - 1
        return index >= 0 and number <= self.highs[index]


def _all_of(parts):
    if len(parts) == 1:
        return parts[0]
    return lambda c: all(p(c) for p in parts)


def _compare(kind, value_of, day):
    if kind == b"BEFORE":
        return lambda c: (value_of(c) or day) < day
    if kind == b"ON":
        return lambda c: value_of(c) == day
    return lambda c: (value_of(c) or 0) >= day


def _day_number(year, month, day):
    try:
        return calendar.timegm((year, month, day, 0, 0, 0)) // 86400
    except (ValueError, OverflowError):
        raise SyntaxError_("Invalid date") from None


def _day_of_timestamp(timestamp):
    return int(timestamp // 86400)


def _sent_day(c):
    """The day of the Date: header as written (its time zone disregarded)."""
    value = c.headers.get("date")
    if not value:
        return None
    parsed = email.utils.parsedate(value.decode("latin-1"))
    if not parsed:
        return None
    try:
        return calendar.timegm(parsed[:3] + (0, 0, 0)) // 86400
    except (ValueError, OverflowError):
        return None


def decode_header_text(value):
    """A header value with RFC 2047 words decoded, case-folded, for matching."""
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text.casefold()
    try:
        decoded = str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        decoded = text
    return decoded.casefold()


def _header_text(c):
    return decode_header_text(c.headers.block)


def _body_text(c):
    end = c.raw.find(b"\r\n\r\n")
    body = c.raw[end + 4:] if end >= 0 else b""
    return body.decode("utf-8", "replace").casefold()

