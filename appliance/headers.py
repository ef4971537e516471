"""The header section of a message as its readers see it: fields and addresses.

One parser for every place that must agree on who a message is from: the
submission check of the From: header and the DKIM signer
(``appliance.message.from_mailboxes``), and IMAP's ENVELOPE
(``appliance.access.imap.mime``), which is what mail clients show. If the
check read a header one way and ENVELOPE another, a user could send as
someone else (``From : bob@...`` was skipped by the email package and shown
as bob by IMAP).

- ``fields(block)``: the header fields of a header block. A line starting
  with a space or tab continues the field before it; a field's name is what
  precedes the first colon, with the white space before the colon dropped
  (RFC 5322 §4.5.3 obsolete syntax ``From :``, which readers honour).
- ``parse_addresses(value)``: an RFC 5322 address list (mailboxes, groups,
  comments, quoted strings, obsolete forms) in one linear pass, never a
  backtracking regex. It always answers (ENVELOPE shows whatever there is)
  and lists ``defects``: anything a reader could take another way. A
  checker trusts an address list only when it has no defect.

Encoded words (RFC 2047) are left as they are: in a display name a reader
decodes them, which changes no address; inside an address (``=?utf-8?q?bob?=
@example.test``) a reader might decode them too, so that is a defect.
"""

import email.errors
import email.header
import re
from typing import NamedTuple

CRLF = b"\r\n"
_NAME_OK = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z").match

# Tokens of an address list. atext (RFC 5322 §3.2.3) plus any non-ASCII
# character (RFC 6532); the specials each stand alone.
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff\udc80-\udcff]+")
_SPACE = re.compile(r"[ \t\r\n]+")
_QUOTED_RUN = re.compile(r'[^"\\]+')
_COMMENT_RUN = re.compile(r"[^()\\]+")
_LITERAL = re.compile(r"\[[^\[\]\\\s]*\]")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[A-Za-z]\?[^?\s]*\?=")
SPECIALS = "<>@,;:."


# -- fields ---------------------------------------------------------------------------------

def header_block(message):
    """The header section of ``message`` (bytes, CRLF lines), its last CRLF
    kept; b"" when the message starts with its blank line."""
    if message.startswith(CRLF):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def fields(block):
    """``[(lower-case name, raw field bytes with CRLF)]`` of a header block.

    A line that is no ``name:`` field (no colon, or a name with spaces or
    controls) gets the name b"" so that no lookup ever finds it. Linear in
    the block: a field's lines are joined once, not one concatenation each."""
    found = []                  # [name, [lines]]
    for line in block.split(CRLF):
        if not line:
            continue
        if line[0] in (0x20, 0x09) and found:
            found[-1][1].append(line)
            continue
        colon = line.find(b":")
        name = line[:colon].rstrip(b" \t").lower() if colon > 0 else b""
        if name and not _NAME_OK(name):
            name = b""
        found.append((name, [line]))
    return [(name, CRLF.join(lines) + CRLF) for name, lines in found]


def loose_name(raw):
    """The name a lenient reader might give a raw field: the text before its
    colon with all surrounding white space dropped (`` From :`` is from)."""
    colon = raw.find(b":")
    return raw[:colon].strip(b" \t").lower() if colon > 0 else b""


def field_value(raw):
    """The unfolded value of a raw field (``Name: value\\r\\n``), bytes."""
    value = raw[raw.find(b":") + 1:]
    if b"\n" in value[:-1]:
        value = value.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t")
    return value.strip(b" \t\r\n")


def values_of(block, name, loose=False, limit=None):
    """The unfolded values of every ``name`` field in ``block``, in order
    (at most ``limit`` of them). ``loose``: also fields whose name only a
    lenient reader would take for ``name`` (white space around it)."""
    name = name.lower()
    values = []
    for found, raw in fields(block):
        if found == name or (loose and loose_name(raw) == name):
            values.append(field_value(raw))
            if limit is not None and len(values) >= limit:
                break
    return values


# -- addresses ------------------------------------------------------------------------------

class Mailbox(NamedTuple):
    """One address: ``name`` (display name, or None), ``local`` (unquoted),
    ``domain`` (None when it has none: a defect). Text, as decoded from
    UTF-8 with surrogateescape."""

    name: object
    local: object
    domain: object

    @property
    def address(self):
        return f"{self.local}@{self.domain}"


class Group(NamedTuple):
    """``name: member, member;`` (RFC 5322 §3.4)."""

    name: str
    members: tuple


class AddressList(NamedTuple):
    items: tuple            # Mailbox and Group, in order
    defects: tuple          # short texts; empty when every reader agrees

    def mailboxes(self):
        """Every Mailbox, group members included, in order."""
        found = []
        for item in self.items:
            found.extend(item.members if isinstance(item, Group) else (item,))
        return found


class _Token(NamedTuple):
    kind: str               # atom, quoted, literal, special, bad
    text: str
    space: bool             # white space or a comment before it


def _tokens(value, defects, comments):
    """The tokens of ``value``; comments go to ``comments`` as
    (index of the next token, text)."""
    tokens, pos, space, end = [], 0, False, len(value)
    while pos < end:
        char = value[pos]
        match = _SPACE.match(value, pos)
        if match:
            pos, space = match.end(), True
            continue
        if char == "(":
            pos, text = _comment(value, pos, defects)
            comments.append((len(tokens), text))
            space = True
            continue
        if char == '"':
            pos, text = _quoted(value, pos, defects)
            tokens.append(_Token("quoted", text, space))
        elif char == "[":
            match = _LITERAL.match(value, pos)
            if match:
                tokens.append(_Token("literal", match.group(), space))
                pos = match.end()
            else:
                defects.append("malformed domain literal")
                tokens.append(_Token("bad", char, space))
                pos += 1
        elif char in SPECIALS:
            tokens.append(_Token("special", char, space))
            pos += 1
        else:
            match = _ATOM.match(value, pos)
            if match:
                tokens.append(_Token("atom", match.group(), space))
                pos = match.end()
            else:
                defects.append(f"unexpected character {char!r}")
                tokens.append(_Token("bad", char, space))
                pos += 1
        space = False
    return tokens


def _quoted(value, pos, defects):
    """``(end, content)`` of the quoted string at ``pos`` (its quote)."""
    out, pos, end = [], pos + 1, len(value)
    while pos < end:
        char = value[pos]
        if char == '"':
            return pos + 1, "".join(out)
        if char == "\\":
            if pos + 1 < end:
                out.append(value[pos + 1])
            pos += 2
            continue
        match = _QUOTED_RUN.match(value, pos)
        out.append(match.group())
        pos = match.end()
    defects.append("unterminated quoted string")
    return end, "".join(out)


def _comment(value, pos, defects):
    """``(end, text)`` of the (possibly nested) comment at ``pos``."""
    out, depth, pos, end = [], 0, pos, len(value)
    while pos < end:
        char = value[pos]
        if char == "(":
            depth += 1
            if depth > 1:
                out.append(char)
            pos += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return pos + 1, "".join(out).strip()
            out.append(char)
            pos += 1
        elif char == "\\":
            out.append(value[pos + 1:pos + 2])
            pos += 2
        else:
            match = _COMMENT_RUN.match(value, pos)
            out.append(match.group())
            pos = match.end()
    defects.append("unterminated comment")
    return end, "".join(out).strip()


class _Parser:
    def __init__(self, value):
        self.defects = []
        comments = []
        self.tokens = _tokens(value, self.defects, comments)
        self.comments = dict(comments)      # first comment before each token index
        self.pos = 0

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def at(self, special):
        token = self.peek()
        return token is not None and token.kind == "special" and token.text == special

    def take(self):
        token = self.peek()
        self.pos += 1
        return token

    def address_list(self):
        items = []
        while self.pos < len(self.tokens):
            if self.at(","):                # obs-addr-list: empty elements
                self.take()
                continue
            start = self.pos
            item = self.address(in_group=False)
            if item is not None:
                items.append(item)
            if self.pos < len(self.tokens) and not self.at(","):
                self.defects.append("text after an address")
                self._skip_to(",")
            if self.pos == start:           # nothing consumed: never loop
                self.take()
        return AddressList(tuple(items), tuple(self.defects))

    def _skip_to(self, *stops):
        while self.pos < len(self.tokens) and not any(self.at(s) for s in stops):
            self.take()

    def _phrase(self):
        """Words (atoms, quoted strings, obsolete dots) up to a special."""
        words = []
        while True:
            token = self.peek()
            if token is None:
                break
            if token.kind in ("atom", "quoted") or (token.kind == "special"
                                                     and token.text == "."):
                words.append(self.take())
                continue
            break
        return words

    def address(self, in_group):
        start = self.pos
        words = self._phrase()
        token = self.peek()
        if token is not None and token.kind == "special":
            if token.text == ":" and not in_group:
                return self._group(words)
            if token.text == "<":
                return self._angle(words)
            if token.text == "@":
                self.pos = start
                return self._addr_spec(name=None)
        if words:
            self.defects.append("no address")
            return Mailbox(None, _joined(words), None)
        if token is not None and not (token.kind == "special" and token.text in ",;"):
            self.defects.append(f"unexpected {token.text!r}")
            self.take()
        return None

    def _group(self, words):
        self.take()                         # the colon
        name = _joined(words) if words else ""
        if not words:
            self.defects.append("group without a name")
        members = []
        while self.pos < len(self.tokens) and not self.at(";"):
            if self.at(","):
                self.take()
                continue
            start = self.pos
            if self.at(":"):
                self.defects.append("group inside a group")
                self.take()
                continue
            member = self.address(in_group=True)
            if member is not None:
                members.append(member)
            if self.pos < len(self.tokens) and not (self.at(",") or self.at(";")):
                self.defects.append("text after an address")
                self._skip_to(",", ";")
            if self.pos == start:
                self.take()
        if self.at(";"):
            self.take()
        else:
            self.defects.append("group without its ;")
        return Group(name, tuple(members))

    def _angle(self, words):
        self.take()                         # <
        name = _joined(words) if words else None
        if self.at("@"):                    # obs-route: @a,@b: (readers drop it)
            self._skip_to(":", ">")
            if self.at(":"):
                self.take()
        if self.at(">"):                    # <> : no address
            self.take()
            self.defects.append("empty address")
            return Mailbox(name, None, None)
        mailbox = self._addr_spec(name)
        if self.at(">"):
            self.take()
        else:
            self.defects.append("address without its >")
            self._skip_to(">", ",")
            if self.at(">"):
                self.take()
        return mailbox

    def _addr_spec(self, name):
        first = self.pos
        local = self._dotted(("atom", "quoted"), "local part")
        if not self.at("@"):
            self.defects.append("no domain")
            return Mailbox(name, local, None)
        self.take()
        domain_token = self.peek()
        if domain_token is not None and domain_token.kind == "literal":
            domain = self.take().text
        else:
            domain = self._dotted(("atom",), "domain")
        if name is None:                    # "a@b (Name)": the comment names it
            name = self._comment_in(first, self.pos)
        return Mailbox(name, local, domain)

    def _dotted(self, kinds, what):
        """``word *("." word)``; white space around the dots is obsolete
        syntax readers accept, and it joins the same way."""
        parts, want_word = [], True
        while True:
            token = self.peek()
            if token is None:
                break
            if want_word and token.kind in kinds:
                if token.kind == "atom" and _ENCODED_WORD.search(token.text):
                    self.defects.append(f"encoded word in the {what}")
                if token.kind == "quoted" and "=?" in token.text:
                    self.defects.append(f"encoded word in the {what}")
                parts.append(token.text)
                self.take()
                want_word = False
            elif not want_word and token.kind == "special" and token.text == ".":
                parts.append(".")
                self.take()
                want_word = True
            else:
                break
        if not parts or want_word:
            self.defects.append(f"malformed {what}")
        return "".join(parts) or None

    def _comment_in(self, start, stop):
        for index in range(start, stop + 1):
            text = self.comments.get(index)
            if text:
                return text
        return None


def _joined(words):
    """A display name: its words, one space where the input had some."""
    out = []
    for word in words:
        if out and word.space and word.text != ".":
            out.append(" ")
        out.append(word.text)
    return "".join(out)


def parse_addresses(value):
    """The AddressList of a header value (str, or bytes read as UTF-8)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    simple = _simple_list(value)
    if simple is not None:
        return simple
    return _Parser(value).address_list()


# The everyday forms, ``a@b.c``, ``Some Name <a@b.c>`` and ``"Some Name"
# <a@b.c>`` (ASCII, one space between the name's words, no comments, groups
# or encoded words in the address), read by one regular expression a list
# element: the same AddressList the token parser gives (tests/test_headers.py
# compares both), at a tenth of the cost (IMAP ENVELOPE over 100,000
# messages). Anything else goes to the parser. No nested repetition can
# overlap (an atom holds neither space nor dot), so it never backtracks far.
_FAST_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_FAST_DOT_ATOM = _FAST_ATOM + r"(?:\." + _FAST_ATOM + r")*"
_FAST_ITEM = re.compile(
    r"[ \t]*(?:"
    r"(?P<local>" + _FAST_DOT_ATOM + r")@(?P<domain>" + _FAST_DOT_ATOM + r")"
    r"|(?:(?P<name>" + _FAST_ATOM + r"(?: " + _FAST_ATOM + r")*)|\"(?P<quoted>[^\"\\\\\r\n]*)\")"
    r"[ \t]*<(?P<alocal>" + _FAST_DOT_ATOM + r")@(?P<adomain>" + _FAST_DOT_ATOM + r")>"
    r")[ \t]*(?P<end>,|\Z)")


def _simple_list(value):
    """The AddressList of ``value`` if every element has an everyday form, else None."""
    if not value.isascii():
        return None
    items, pos, end = [], 0, len(value)
    match_at = _FAST_ITEM.match
    while True:
        found = match_at(value, pos)
        if found is None:
            return None
        local = found.group("local")
        if local is not None:
            name, domain = None, found.group("domain")
        else:
            name = found.group("name")
            if name is None:
                name = found.group("quoted")
            local, domain = found.group("alocal"), found.group("adomain")
        if "=?" in local or "=?" in domain:
            return None
        items.append(Mailbox(name, local, domain))
        pos = found.end()
        if not found.group("end"):
            return AddressList(tuple(items), ())
        if pos >= end:              # a trailing comma: the parser's business
            return None


_NAME_SEPARATORS = re.compile(r"[\s<>()\[\]\"',;:]+")


def addresses_in_name(name):
    """Address-like words (``local@domain.tld``) in a display name, encoded
    words decoded first: a mail client shows ``"bob@example.test"
    <alice@example.test>`` as bob. Linear: the name is split, never searched
    with a backtracking pattern."""
    if not name or "@" not in name and "=?" not in name:
        return []
    text = name
    if "=?" in name:
        try:
            text = str(email.header.make_header(email.header.decode_header(name)))
        except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
            text = name
    found = []
    for word in _NAME_SEPARATORS.split(text):
        local, at, domain = word.strip(".").rpartition("@")
        if at and local and "." in domain.strip(".") and "@" not in local:
            found.append(f"{local}@{domain.strip('.')}")
    return found
