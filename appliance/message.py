"""The message as bytes: its header section, the fields we read and the text
we write into headers.

Every reader of a header field goes through here, so the From: that the
submission check, the DKIM signer and the inbound checks see is one parse;
and everything taken from a client into a header we add passes
``header_safe`` first (TWISTED-TRAPS T17).
"""

from appliance import headers as mailheaders
from appliance.headers import header_block

# The From: fields read at all (RFC 5322 §3.6: one; a few more are tolerated,
# each checked) and their octets together: the parse runs on the reactor for
# submission, so its work is bounded whatever the client sends.
MAX_FROM_FIELDS = 5
MAX_FROM_OCTETS = 2048


def header_safe(text, allow_utf8=False):
    """``text`` with every control character (and, unless allowed, non-ASCII) as ``?``."""
    if text.isascii() and text.isprintable():
        return text                 # the usual case, checked in C
    def keep(char):
        if char.isascii():
            return 0x20 <= ord(char) < 0x7f
        return allow_utf8 and char.isprintable()
    return "".join(char if keep(char) else "?" for char in text)


class AmbiguousFrom(ValueError):
    """A From: header that parsers could read differently."""


def from_mailboxes(body):
    """The mailboxes of every From: field of ``body`` (bytes, CRLF lines),
    read as IMAP ENVELOPE and mail readers read them (``appliance.headers``,
    the one address parser), also the fields only a lenient reader takes
    for From: (``From :``, leading white space); AmbiguousFrom when any of
    them has a defect (an address a reader could take another way), or when
    there are more than ``MAX_FROM_FIELDS`` of them or more than
    ``MAX_FROM_OCTETS`` in all."""
    if body.startswith(b"\r\n"):
        return []                   # no header section at all
    values = mailheaders.values_of(header_block(body), b"from", loose=True,
                                   limit=MAX_FROM_FIELDS + 1)
    if len(values) > MAX_FROM_FIELDS or sum(map(len, values)) > MAX_FROM_OCTETS:
        raise AmbiguousFrom("too many From: fields, or too long")
    found = []
    for value in values:
        parsed = mailheaders.parse_addresses(value)
        if parsed.defects:
            raise AmbiguousFrom(parsed.defects[0])
        found.extend(parsed.mailboxes())
    return found


def from_addresses(body):
    """The addresses in the From: headers of ``body`` (bytes, CRLF lines),
    as ``local@domain`` strings ([] when there is none); AmbiguousFrom when
    a From: header is malformed."""
    return [mailbox.address for mailbox in from_mailboxes(body)]


def header_fields(message):
    """``[(name, start, end)]``: each header field of ``message`` (bytes, CRLF
    lines) with its continuation lines; ``name`` lower-case bytes, or None for
    a line that is not a field. Offsets are into ``message``."""
    if message.startswith(b"\r\n"):
        return []
    end = message.find(b"\r\n\r\n")
    end = len(message) if end < 0 else end + 2
    fields, pos = [], 0
    while pos < end:
        newline = message.find(b"\r\n", pos, end)
        line_end = end if newline < 0 else newline + 2
        if message[pos:pos + 1] in (b" ", b"\t") and fields:
            fields[-1][2] = line_end
        else:
            line = message[pos:line_end]
            name = line.split(b":", 1)[0].strip().lower() if b":" in line else None
            fields.append([name, pos, line_end])
        pos = line_end
    return [tuple(field) for field in fields]


def _head(message):
    """The header section of ``message`` as ``header_fields`` bounds it."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def field_value(message, start, end):
    """A field's value, unfolded, as text."""
    raw = message[start:end].split(b":", 1)[1]
    return raw.replace(b"\r\n", b"").decode("utf-8", "replace")


def _without_comments(text):
    """``text`` with RFC 5322 comments (nested, with quoted pairs) removed."""
    out, depth, escaped = [], 0, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and depth:
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(char)
    return "".join(out)


def claims_authserv_id(value, hostname, site=()):
    """True when an Authentication-Results value names ``hostname`` as its
    authserv-id (comments, quotes, case and a trailing dot not counting),
    or, with ``site`` (lower-case ASCII names), one of them or a name under
    one of them: the names of our own ADMD (RFC 8601 §5)."""
    head = _without_comments(value).split(";", 1)[0]
    ours = hostname.rstrip(".").lower()
    for token in head.split():
        name = token.strip('"').rstrip(".").lower()
        if name == ours or any(name == s or name.endswith("." + s) for s in site):
            return True
    return False


def strip_forged(message, hostname, fields=None, site=()):
    """``(message without our-hostname Authentication-Results fields, count removed)``;
    with ``site``, without those naming our site either (``claims_authserv_id``)."""
    if fields is None:
        if b"authentication-results" not in _head(message).lower():
            return message, 0       # the usual message: no field to look at, no parse
        fields = header_fields(message)
    forged = [(start, end) for name, start, end in fields
              if name == b"authentication-results"
              and claims_authserv_id(field_value(message, start, end), hostname, site)]
    if not forged:
        return message, 0
    parts, pos = [], 0
    for start, end in forged:
        parts.append(message[pos:start])
        pos = end
    parts.append(message[pos:])
    return b"".join(parts), len(forged)
