"""What IMAP FETCH says about a message: ENVELOPE, BODYSTRUCTURE, sections.

Twisted's helpers (``getEnvelope``, ``getBodyStructure``, ``_formatHeaders``)
work on parsed ``IMessage`` objects: they re-case and re-fold headers (so
``BODY[HEADER]`` is not the stored header), crash on non-ASCII values and on
a parameter without ``=``, and count lines by iterating the body. Here all of
it works on the message bytes (CRLF lines) as stored, the way RFC 3501 §6.4.5
and §7.4.2 define it: sections are exact slices of the message, strings
are returned raw (encoded words undecoded) and anything that is not 7-bit
safe goes out as a literal.

MIME nesting is followed to ``MAX_DEPTH`` levels; deeper parts are opaque
(a crafted message cannot make the parser recurse without bound).
"""

import re

from appliance import headers as mailheaders

CRLF = b"\r\n"
MAX_DEPTH = 20
_QUOTED_SAFE_MATCH = re.compile(rb'[\x01-\x09\x0b\x0c\x0e-\x7f]*\Z').match
_PLAIN_MATCH = re.compile(rb'[\x01-\x09\x0b\x0c\x0e-\x21\x23-\x5b\x5d-\x7f]*\Z').match   # no " or \
_TOKEN = re.compile(rb'\s*(?:"((?:[^"\\]|\\.)*)"|([^;"]*))', re.S)


# -- IMAP string syntax -------------------------------------------------------------

def quoted(data):
    """``data`` as an IMAP quoted string (the caller knows it is safe)."""
    if b"\\" in data or b'"' in data:
        data = data.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'"' + data + b'"'


def astring_out(data):
    """``data`` as an IMAP string: quoted when 7-bit and short, else a literal."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) < 1000:
        if _PLAIN_MATCH(data):          # the usual case: nothing to escape
            return b'"' + data + b'"'
        if _QUOTED_SAFE_MATCH(data):
            return quoted(data)
    return b"{%d}\r\n" % len(data) + data


def nstring(data):
    """An IMAP nstring: NIL for None."""
    return b"NIL" if data is None else astring_out(data)


def plist(items):
    """A parenthesised list of already formatted items."""
    return b"(" + b" ".join(items) + b")"


# -- headers ----------------------------------------------------------------------------

def split_message(raw):
    """``(header block with its blank line, body)`` of a CRLF message."""
    if raw.startswith(CRLF):
        return CRLF, raw[2:]
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw, b""
    return raw[:end + 4], raw[end + 4:]


# One reading of the header for ENVELOPE and the submission check
# (appliance.headers): what a client shows is what was checked.
header_fields = mailheaders.fields
field_value = mailheaders.field_value


class Headers:
    """A header block with lookups by name (first occurrence)."""

    def __init__(self, block):
        self.block = block
        self.fields = header_fields(block)
        self._first = {}
        for name, raw in self.fields:
            self._first.setdefault(name, raw)

    def get(self, name):
        """The unfolded value of the first ``name`` field (bytes), or None."""
        if isinstance(name, str):
            name = name.encode("ascii")
        raw = self._first.get(name.lower())
        return None if raw is None else field_value(raw)

    def select(self, names, negate=False):
        """HEADER.FIELDS / HEADER.FIELDS.NOT: the chosen fields as stored, plus CRLF."""
        wanted = {n.lower() for n in names}
        chosen = [raw for name, raw in self.fields if (name in wanted) != negate]
        return b"".join(chosen) + CRLF


# -- content types ----------------------------------------------------------------------

def parse_params(text):
    """``; a=b; c="d e"`` -> ``[(b"A", b"b"), (b"C", b"d e")]`` (names upper-cased)."""
    params = []
    for piece in _split_semicolons(text):
        name, eq, value = piece.partition(b"=")
        name = name.strip()
        if not eq or not name:
            continue
        value = value.strip()
        if value.startswith(b'"') and value.endswith(b'"') and len(value) >= 2:
            value = re.sub(rb"\\(.)", rb"\1", value[1:-1])
        params.append((name.upper(), value))
    return params


def _split_semicolons(text):
    pieces, current, quoted_ = [], bytearray(), False
    i = 0
    while i < len(text):
        c = text[i:i + 1]
        if quoted_ and c == b"\\":
            current += text[i:i + 2]
            i += 2
            continue
        if c == b'"':
            quoted_ = not quoted_
        if c == b";" and not quoted_:
            pieces.append(bytes(current))
            current = bytearray()
        else:
            current += c
        i += 1
    pieces.append(bytes(current))
    return pieces


def content_type(headers, default=(b"TEXT", b"PLAIN")):
    """``(TYPE, SUBTYPE, params)`` upper-cased, with RFC 2045's defaults."""
    value = headers.get("content-type")
    if value:
        kind, _, rest = value.partition(b";")
        main, slash, sub = kind.strip().partition(b"/")
        if slash and main.strip() and sub.strip():
            main, params = main.strip().upper(), parse_params(rest)
            if main == b"TEXT" and not any(name == b"CHARSET" for name, _ in params):
                params.insert(0, (b"CHARSET", b"US-ASCII"))     # RFC 2045 §5.2
            return main, sub.strip().upper(), params
    if default == (b"TEXT", b"PLAIN"):
        return b"TEXT", b"PLAIN", [(b"CHARSET", b"US-ASCII")]
    return default[0], default[1], []


# -- the MIME tree -----------------------------------------------------------------------

class Part:
    """One MIME entity: its header block, body, type and sub-parts.

    ``children`` for a multipart; ``message`` (a Part) for message/rfc822.
    """

    def __init__(self, raw, depth=0, default=(b"TEXT", b"PLAIN"), structure=True):
        self.raw = raw
        self.header, self.body = split_message(raw)
        self.headers = Headers(self.header)
        self.children = []
        self.message = None
        if not structure:           # a header block alone (ENVELOPE, BODY[HEADER])
            return
        self.main, self.sub, self.params = content_type(self.headers, default)
        if depth >= MAX_DEPTH:
            return
        if self.main == b"MULTIPART":
            boundary = dict(self.params).get(b"BOUNDARY")
            if boundary:
                child_default = (b"MESSAGE", b"RFC822") if self.sub == b"DIGEST" \
                    else (b"TEXT", b"PLAIN")
                self.children = [Part(chunk, depth + 1, child_default)
                                 for chunk in split_multipart(self.body, boundary)]
        elif (self.main, self.sub) == (b"MESSAGE", b"RFC822"):
            self.message = Part(self.body, depth + 1)

    @property
    def is_multipart(self):
        return self.main == b"MULTIPART" and bool(self.children)


def split_multipart(body, boundary):
    """The raw body parts of a multipart body (between its boundary lines)."""
    delimiter = b"--" + boundary
    parts, start = [], None
    lines = body.split(CRLF)
    offset = 0
    for line in lines:
        line_end = offset + len(line) + 2
        if line.startswith(delimiter):
            tail = line[len(delimiter):]
            closing = tail.startswith(b"--")
            if closing:
                tail = tail[2:]
            if not tail.strip(b" \t"):
                if start is not None:
                    parts.append(body[start:max(start, offset - 2)])
                if closing:
                    return parts
                start = line_end
        offset = line_end
    if start is not None and start <= len(body):
        parts.append(body[start:])
    return parts


def _numbered(message, number):
    """Part ``number`` of a message (top level or encapsulated): a multipart's
    children, or the message itself as part 1."""
    if message.is_multipart:
        return message.children[number - 1] if 0 < number <= len(message.children) else None
    return message if number == 1 else None


def find_part(root, numbers):
    """The part at ``numbers`` (e.g. [1, 2] for ``1.2``) under ``root``, or None."""
    part = _numbered(root, numbers[0])
    for number in numbers[1:]:
        if part is None:
            return None
        if part.message is not None:
            part = _numbered(part.message, number)
        elif part.is_multipart:
            part = _numbered(part, number)
        else:
            return None
    return part


def section(root, numbers, kind, fields=()):
    """The octets of BODY[<numbers>.<kind>] (kind "", HEADER, HEADER.FIELDS,
    HEADER.FIELDS.NOT, TEXT or MIME), or None if there is no such part."""
    if not numbers:
        target, message = root, root
    else:
        target = find_part(root, numbers)
        if target is None:
            return None
        message = target.message
    if kind == "":
        return target.raw if not numbers else target.body
    if kind == "MIME":
        return target.header if numbers else None
    if message is None:
        return None
    if kind == "HEADER":
        return message.header
    if kind == "HEADER.FIELDS":
        return message.headers.select(fields)
    if kind == "HEADER.FIELDS.NOT":
        return message.headers.select(fields, negate=True)
    if kind == "TEXT":
        return message.body
    return None


# -- ENVELOPE ----------------------------------------------------------------------------

def _raw(text):
    return text.encode("utf-8", "surrogateescape")


def _address(mailbox):
    return (b"(" + nstring(_raw_or_none(mailbox.name)) + b" NIL " +
            nstring(_raw_or_none(mailbox.local)) + b" " +
            nstring(_raw_or_none(mailbox.domain)) + b")")


def _raw_or_none(text):
    return None if text is None else _raw(text)


def address_list(value):
    """An ENVELOPE address list for a header value (bytes), or NIL. Groups
    are written as RFC 3501 §7.4.2 says: a start marker with the group's
    name, the members, an end marker."""
    if value is None:
        return b"NIL"
    out = []
    for item in mailheaders.parse_addresses(value).items:
        if isinstance(item, mailheaders.Group):
            out.append(b"(NIL NIL " + nstring(_raw(item.name)) + b" NIL)")
            out.extend(_address(member) for member in item.members)
            out.append(b"(NIL NIL NIL NIL)")
        else:
            out.append(_address(item))
    return b"(" + b"".join(out) + b")" if out else b"NIL"


def envelope(headers):
    """The ENVELOPE of a message's Headers (RFC 3501 §7.4.2)."""
    get = headers.get
    sender_from = address_list(get(b"from"))
    sender = get(b"sender")
    reply_to = get(b"reply-to")
    return plist([
        nstring(get(b"date")),
        nstring(get(b"subject")),
        sender_from,
        address_list(sender) if sender else sender_from,
        address_list(reply_to) if reply_to else sender_from,
        address_list(get(b"to")),
        address_list(get(b"cc")),
        address_list(get(b"bcc")),
        nstring(get(b"in-reply-to")),
        nstring(get(b"message-id")),
    ])


# -- BODYSTRUCTURE -----------------------------------------------------------------------

def _params(params):
    if not params:
        return b"NIL"
    return plist([item for name, value in params for item in (quoted_or_literal(name),
                                                            quoted_or_literal(value))])


def quoted_or_literal(value):
    return astring_out(value)


def _disposition(headers):
    value = headers.get("content-disposition")
    if not value:
        return b"NIL"
    kind, _, rest = value.partition(b";")
    return plist([astring_out(kind.strip().upper() or b"ATTACHMENT"),
                  _params(parse_params(rest))])


def _language(headers):
    value = headers.get("content-language")
    if not value:
        return b"NIL"
    tags = [t.strip() for t in value.split(b",") if t.strip()]
    return plist([astring_out(t) for t in tags]) if tags else b"NIL"


def line_count(body):
    return body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)


def body_structure(part, extended=True):
    """BODYSTRUCTURE (``extended``) or BODY of ``part``."""
    if part.is_multipart:
        children = b"".join(body_structure(c, extended) for c in part.children)
        fields = [children + b" " + astring_out(part.sub)] if children else [astring_out(part.sub)]
        if extended:
            fields += [_params(part.params), _disposition(part.headers),
                       _language(part.headers), nstring(part.headers.get("content-location"))]
        return plist(fields)
    headers = part.headers
    encoding = headers.get("content-transfer-encoding")
    fields = [astring_out(part.main), astring_out(part.sub), _params(part.params),
              nstring(headers.get("content-id")), nstring(headers.get("content-description")),
              astring_out(encoding.upper() if encoding else b"7BIT"),
              b"%d" % len(part.body)]
    if part.message is not None:
        fields += [envelope(part.message.headers), body_structure(part.message, extended),
                   b"%d" % line_count(part.body)]
    elif part.main == b"TEXT":
        fields.append(b"%d" % line_count(part.body))
    if extended:
        fields += [nstring(headers.get("content-md5")), _disposition(headers),
                   _language(headers), nstring(headers.get("content-location"))]
    return plist(fields)
