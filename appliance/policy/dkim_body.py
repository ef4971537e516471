"""DKIM body canonicalisation in linear time, in slices; header-only dkimpy parsing.

dkimpy (1.1.4 to 1.1.8) canonicalises a body with regular expressions over
the whole body in one call: ``[\\t ]+\\r\\n`` is quadratic on a line of
spaces followed by anything but CRLF (2 MB froze the process for seconds),
and even the linear ``[\\t ]+`` substitution and ``rfc822_parse``'s split of
the whole message into lines cost seconds on 25 MB of short lines. A regular
expression is one C call: it holds the GIL from start to end, so running it
on a worker thread stops the reactor just the same (TWISTED-TRAPS T24).

Here:

- ``relaxed_body`` and ``simple_body`` give exactly dkimpy's results (RFC
  6376 §3.4.3, §3.4.4, including dkimpy's handling of bare CR and LF) with
  byte-string methods over ``SLICE`` octets at a time: each call is short,
  the GIL changes hands between them, and the total is linear.
  ``install()`` makes dkimpy's ``Relaxed`` and ``Simple`` use them (for
  every caller in the process: the results are the same, only faster).
- ``dkim_object(message)`` builds a ``dkim.DKIM`` from the header section
  alone and gives it the body (line ends made CRLF as dkimpy does, in
  slices) without dkimpy's line split of the body.
"""

import re

import dkim
from dkim import canonicalization

SLICE = 64 * 1024               # octets handled per call
_TABS_TO_SPACES = bytes.maketrans(b"\t", b" ")
_BLANK_LINE = re.compile(rb"\n\r?\n")


def _wsp_to_single_spaces(text):
    """Every run of spaces and tabs in ``text`` as one space."""
    text = text.translate(_TABS_TO_SPACES)
    while b"  " in text:        # each pass halves every run: log2(longest run) passes
        text = text.replace(b"  ", b" ")
    return text


def _relaxed_piece(piece):
    """RFC 6376 §3.4.4 a. and b. for a piece that no run of WSP, and no CR LF,
    crosses the end of: runs become one space, none is left before CRLF."""
    return _wsp_to_single_spaces(piece).replace(b" \r\n", b"\r\n")


def _split_held(piece):
    """``(done, held)``: the part of ``piece`` that nothing after it can
    change, and the part the next piece may change: trailing WSP (as one
    space: a run counts the same whatever its length) and a trailing CR (the
    next piece may start with its LF)."""
    bare = piece.rstrip(b" \t")
    if len(bare) < len(piece):
        return bare, b" "
    if bare.endswith(b"\r"):
        before = bare[:-1].rstrip(b" \t")
        return before, (b" \r" if len(before) < len(bare) - 1 else b"\r")
    return piece, b""


def trailing_crlf_pairs(text):
    """How many CRLF pairs ``text`` ends with, in linear time."""
    tail = text[len(text.rstrip(b"\r\n")):]
    if not tail.endswith(b"\r\n"):
        return 0
    # In a run of CR and LF only, the CRLF pairs at the end are preceded by a
    # doubled character (or the run's start).
    start = max(tail.rfind(b"\r\r"), tail.rfind(b"\n\n")) + 1
    return (len(tail) - start) // 2


def simple_body(body):
    """dkimpy's ``Simple.canonicalize_body``: no empty lines at the end,
    one CRLF at the end of a non-empty body (RFC 6376 §3.4.3)."""
    pairs = trailing_crlf_pairs(body)
    if pairs == 0:
        return body + b"\r\n"
    if pairs == 1:
        return body
    return body[:len(body) - 2 * (pairs - 1)]


def relaxed_body(body):
    """dkimpy's ``Relaxed.canonicalize_body`` (RFC 6376 §3.4.4)."""
    out, held = [], b""
    for start in range(0, len(body), SLICE):
        done, held = _split_held(held + body[start:start + SLICE])
        out.append(_relaxed_piece(done))
    out.append(_relaxed_piece(held))
    canonical = simple_body(b"".join(out))
    return b"" if canonical == b"\r\n" else canonical


def crlf_lines(body):
    """``body`` with every ``\\r?\\n`` as CRLF, as dkimpy's ``rfc822_parse``
    makes it, in slices."""
    if body.count(b"\n") == body.count(b"\r\n"):
        return body             # the usual case: nothing to change
    out, held = [], b""
    for start in range(0, len(body), SLICE):
        piece = held + body[start:start + SLICE]
        held = b"\r" if piece.endswith(b"\r") else b""
        if held:
            piece = piece[:-1]
        out.append(piece.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    out.append(held)
    return b"".join(out)


def split_message(message):
    """``(header part, body)`` the way dkimpy's ``rfc822_parse`` splits a
    message: the body starts after the first empty line (CRLF or LF)."""
    if message.startswith((b"\r\n", b"\n")):
        return b"", message[message.index(b"\n") + 1:]
    match = _BLANK_LINE.search(message)
    if match is None:
        return message, b""
    return message[:match.start() + 1], message[match.end():]


def dkim_object(message, **options):
    """A ``dkim.DKIM`` for ``message`` that has parsed only its header
    section; its body is set directly (dkimpy's own split of the body into
    lines is one pass over the whole message that holds the GIL).
    dkim.MessageFormatError for a header section dkimpy cannot split
    (dkimpy raises IndexError for a first line that is a continuation)."""
    head, body = split_message(message)
    try:
        signer = dkim.DKIM(head + b"\r\n" if head else None, **options)
    except IndexError:
        raise dkim.MessageFormatError("a continuation line before any field") from None
    signer.body = crlf_lines(body)
    return signer


def install():
    """Make dkimpy's body canonicalisation ours (same results, linear)."""
    canonicalization.Simple.canonicalize_body = staticmethod(simple_body)
    canonicalization.Relaxed.canonicalize_body = staticmethod(relaxed_body)


install()
