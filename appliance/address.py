"""Mail addresses as SMTP carries them (RFC 5321 §4.1.2; RFC 6531 for UTF-8).

``parse_path`` reads the ``<...>`` of MAIL FROM / RCPT TO strictly and returns
a ``Path`` with the local part unquoted. ``canonical`` is the one form every
lookup, policy decision and envelope uses: local part unquoted and lower-cased,
domain lower-cased, IDNA-decoded to Unicode, without a trailing dot.

We do this ourselves because twisted.mail's ``Address.dequote`` fails on
Python 3 and leaves quoted local parts quoted (TWISTED-TRAPS T18): a lookup on
``"alice"@example.test`` would then miss ``alice@example.test``.
"""

import functools
import ipaddress
import re
from dataclasses import dataclass

MAX_LOCAL = 64      # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255    # octets, §4.5.3.1.2
MAX_PATH = 256      # octets including the angle brackets, §4.5.3.1.3

# Any non-ASCII character; whether it is allowed (SMTPUTF8) and printable is
# checked apart from the grammar.
_UTF8 = "\u0080-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-" + _UTF8
_ATOM = f"[{_ATEXT}]+"
_DOT_STRING = re.compile(f"{_ATOM}(?:\\.{_ATOM})*")
_QUOTED = re.compile('"((?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e' + _UTF8 + ']|\\\\[\\x20-\\x7e])*)"')
_LET_DIG = "A-Za-z0-9" + _UTF8
_LABEL = f"[{_LET_DIG}](?:[{_LET_DIG}\\-]*[{_LET_DIG}])?"
_DOMAIN = re.compile(f"{_LABEL}(?:\\.{_LABEL})*")
_LITERAL = re.compile(r"\[([\x21-\x5a\x5e-\x7e]+)\]")
_DNS_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9])?\Z")


class AddressError(ValueError):
    """An address we refuse; ``kind`` is syntax, too_long or non_ascii."""

    def __init__(self, message, kind="syntax"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Path:
    """A parsed reverse- or forward-path: unquoted local part and domain.

    Both keep the case the client used; ``canonical()`` is the lookup form.
    The null reverse-path ``<>`` has both empty.
    """

    local: str = ""
    domain: str = ""

    @property
    def is_null(self):
        return not self.local and not self.domain

    def canonical(self):
        if self.is_null:
            return ""
        return f"{self.local.lower()}@{canonical_domain(self.domain)}"

    def __str__(self):
        """The address as written in SMTP, re-quoted where needed, no brackets."""
        return "" if self.is_null else f"{quote_local(self.local)}@{self.domain}"


NULL_PATH = Path()


def _octets(text):
    return len(text.encode("utf-8", "surrogateescape"))


def _unquote(content):
    return re.sub(r"\\(.)", r"\1", content)


def quote_local(local):
    """``local`` as an RFC 5321 Local-part: a dot-string if it is one, else quoted."""
    if _DOT_STRING.fullmatch(local):
        return local
    return '"' + re.sub(r'(["\\])', r"\\\1", local) + '"'


def smtp_path(address):
    """``<...>`` for an unquoted (canonical) address, re-quoting its local part."""
    if not address:
        return "<>"
    local, _, domain = address.rpartition("@")
    return f"<{quote_local(local)}@{domain}>"


def split_path(text):
    """Split ``<path> rest`` at the ``>`` that closes the path (quotes respected).

    Returns ``(path, rest)``; raises AddressError when there is no closed path.
    """
    if not text.startswith("<"):
        raise AddressError("the address must be enclosed in <>")
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return text[: index + 1], text[index + 1:]
    raise AddressError("the address has no closing >")


def parse_path(text, *, allow_null=False, allow_utf8=False, allow_postmaster=False):
    """Parse ``<local@domain>`` (RFC 5321 Path) into a ``Path``, or AddressError.

    Source routes (``<@a,@b:u@d>``) are checked and dropped (RFC 5321 §4.1.2
    says to ignore them). ``<postmaster>`` without a domain is accepted only
    with ``allow_postmaster`` (RCPT, §4.5.1) and has an empty domain.
    """
    if _octets(text) > MAX_PATH:
        raise AddressError("the address is too long", "too_long")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("the address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return NULL_PATH
        raise AddressError("the null address <> is not allowed here")
    if not inner.isascii() and not allow_utf8:
        raise AddressError("non-ASCII address without SMTPUTF8", "non_ascii")
    if not inner.isprintable():
        raise AddressError("control characters in the address")
    inner = _strip_source_route(inner)
    if allow_postmaster and inner.lower() == "postmaster":
        return Path("postmaster", "")
    return _parse_mailbox(inner)


def _strip_source_route(inner):
    if not inner.startswith("@"):
        return inner
    route, colon, mailbox = inner.partition(":")
    if not colon or not all(hop.startswith("@") and _DOMAIN.fullmatch(hop[1:])
                            for hop in route.split(",")):
        raise AddressError("malformed source route")
    return mailbox


def _parse_mailbox(inner):
    if inner.startswith('"'):
        match = _QUOTED.match(inner)
        if not match:
            raise AddressError("malformed quoted local part")
        local_text, local = match.group(0), _unquote(match.group(1))
        rest = inner[match.end():]
    else:
        local_text, at, domain = inner.partition("@")
        if not _DOT_STRING.fullmatch(local_text):
            raise AddressError("malformed local part")
        local, rest = local_text, at + domain
    if not rest.startswith("@"):
        raise AddressError("the address has no @domain")
    domain = rest[1:]
    _check_domain(domain)
    if _octets(local_text) > MAX_LOCAL:
        raise AddressError("the local part is too long", "too_long")
    if _octets(domain) > MAX_DOMAIN:
        raise AddressError("the domain is too long", "too_long")
    return Path(local, domain)


def _check_domain(domain):
    literal = _LITERAL.fullmatch(domain)
    if literal:
        _check_literal(literal.group(1))
    elif _DOMAIN.fullmatch(domain):
        if any(len(label) > 63 for label in domain.split(".")):
            raise AddressError("a domain label is longer than 63 octets")
        canonical_domain(domain)        # raises on labels IDNA cannot take
    else:
        raise AddressError("malformed domain")


def _check_literal(content):
    """IPv4 or ``IPv6:`` address literals only (no other tag is registered)."""
    try:
        if content[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(content[5:])
        else:
            ipaddress.IPv4Address(content)
    except ValueError:
        raise AddressError("malformed address literal") from None


@functools.lru_cache(maxsize=4096)     # asked several times per message, same few domains
def canonical_domain(domain):
    """Lower-case, U-labels (``xn--`` decoded), no trailing dot.

    The same form the configuration keeps ``[server] domains`` in, so a
    lookup compares like with like.
    """
    name = domain.strip().rstrip(".")
    if name.startswith("["):
        return name.lower()
    return ".".join(_canonical_label(label) for label in name.lower().split("."))


@functools.lru_cache(maxsize=4096)
def dns_name(domain):
    """``domain`` as a DNS name to look up or to report: lower-case, A-label
    (``xn--``) form, no final dot; None if it cannot be a host name (one
    label only, characters no host name has, IDNA refuses it). Answers are
    kept (the checks of one message ask it six times, over Python's IDNA codec)."""
    domain = domain.strip().rstrip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return domain if "." in domain and _DNS_NAME.match(domain) else None


def _canonical_label(label):
    if label.isascii() and not label.startswith("xn--"):
        return label
    try:
        ascii_label = label.encode("idna").decode("ascii")
        if ascii_label.startswith("xn--"):
            return ascii_label.encode("ascii").decode("idna")
        return ascii_label
    except UnicodeError:
        raise AddressError(f"invalid internationalised domain label {label!r}") from None


def canonical(addr):
    """The lookup form of an address (see the module docstring).

    Accepts ``local@domain`` with a plain or quoted local part, a ``<path>``,
    ``@domain`` (a catch-all key) and ``""`` (the null sender).
    """
    addr = addr.strip()
    if addr.startswith("<"):
        return parse_path(addr, allow_null=True, allow_utf8=True).canonical()
    if not addr:
        return ""
    if addr.startswith('"'):
        match = _QUOTED.match(addr)
        if not match or addr[match.end():match.end() + 1] != "@":
            raise AddressError("malformed quoted local part")
        local, domain = _unquote(match.group(1)), addr[match.end() + 1:]
    else:
        local, at, domain = addr.rpartition("@")
        if not at:
            return addr.lower()
    return f"{local.lower()}@{canonical_domain(domain)}"


# -- IP addresses (clients, literals, config values) ------------------------------------

@functools.lru_cache(maxsize=4096)
def domain_of(address):
    """The domain part of ``address`` (as written; "" when it has none)."""
    return address.rpartition("@")[2]


def parse_ip(text):
    """The parsed address (asked several times per connection), or None."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=8192)
@functools.lru_cache(maxsize=4096)     # every connection and limit asks it of the same few clients
def normal_ip(value):
    """The one normal form of a client IP: the ``ipaddress`` address of text
    (``[...]`` allowed) or of an address object, IPv4-mapped IPv6 as IPv4
    (``::ffff:192.0.2.1`` must not slip past an IPv4 rule); None when it is
    not an IP."""
    if not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        value = parse_ip(str(value).strip().strip("[]"))
        if value is None:
            return None
    return getattr(value, "ipv4_mapped", None) or value


def is_ip(text):
    """True when ``text`` is an IPv4 or IPv6 address (not a host name)."""
    return parse_ip(text) is not None
