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
- ``BodyHashes`` does the same canonicalisations incrementally, piece by
  piece as a body arrives or is read back, and hashes them: a body of any
  size is hashed in bounded memory (issue 17: a DATA body that outgrew
  memory is in the spool's file, ``appliance.queue.incoming``).
  ``BodyDigests`` answers the digests a signer or verifier asks for, from a
  body in memory or from its file, one pass for all of them.
"""

import hashlib
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


class _Simple:
    """``simple_body`` over pieces: trailing CRLF pairs are held back (as a
    count) until something else follows them. A piece never ends inside a
    CRLF (the stages before hold a trailing CR back)."""

    def __init__(self, out):
        self.out = out              # called with each canonical piece
        self.pairs = 0
        self.emitted = False        # anything but CRLF pairs so far

    def feed(self, piece):
        if not piece:
            return
        pairs = trailing_crlf_pairs(piece)
        if 2 * pairs == len(piece):
            self.pairs += pairs
            return
        self._flush_pairs()
        self.out(piece[:len(piece) - 2 * pairs])
        self.emitted = True
        self.pairs = pairs

    def _flush_pairs(self):
        while self.pairs:
            run = min(self.pairs, max(1, SLICE // 2))
            self.out(b"\r\n" * run)
            self.pairs -= run

    def close(self, relaxed=False):
        if relaxed and not self.emitted:
            return                  # relaxed: an empty body is empty (RFC 6376 §3.4.4)
        self.out(b"\r\n")


class _Relaxed:
    """``relaxed_body`` over pieces (the held part as in ``relaxed_body``)."""

    def __init__(self, out):
        self.simple = _Simple(out)
        self.held = b""

    def feed(self, piece):
        done, self.held = _split_held(self.held + piece)
        self.simple.feed(_relaxed_piece(done))

    def close(self):
        self.simple.feed(_relaxed_piece(self.held))
        self.simple.close(relaxed=True)


class BodyHashes:
    """The DKIM body hashes of a body fed in pieces of any size and split.

    ``wanted``: ``(canonicalisation, hash name)`` pairs, e.g. ``(b"relaxed",
    "sha256")``. ``update(piece)`` takes the body as dkimpy would see it
    (bare LF made CRLF here, as ``crlf_lines`` does); ``digests()`` ends the
    body: ``{(canonicalisation, hash name): digest}``, exactly the hashes of
    dkimpy's canonical forms (``relaxed_body``/``simple_body`` of
    ``crlf_lines(body)``). Memory: a few octets held between pieces.
    """

    def __init__(self, wanted):
        self._hashers = {}
        self._stages = []
        for canon in {canon for canon, _ in wanted}:
            hashers = [(name, hashlib.new(name)) for c, name in wanted if c == canon]
            self._hashers.update(((canon, name), h) for name, h in hashers)

            def out(piece, hashers=hashers):
                for _, h in hashers:
                    h.update(piece)
            self._stages.append(_Relaxed(out) if canon == b"relaxed" else _Simple(out))
        self._cr = b""              # a CR at the end of the last piece: its LF may follow

    def update(self, piece):
        for start in range(0, len(piece), SLICE):
            self._feed(piece[start:start + SLICE])

    def _feed(self, piece):
        piece = self._cr + piece
        self._cr = b"\r" if piece.endswith(b"\r") else b""
        if self._cr:
            piece = piece[:-1]
        if piece.count(b"\n") != piece.count(b"\r\n"):
            piece = piece.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        for stage in self._stages:
            stage.feed(piece)

    def digests(self):
        for stage in self._stages:
            stage.feed(self._cr)
            stage.close()
        self._cr = b""
        return {key: h.digest() for key, h in self._hashers.items()}


def hash_name(algorithm):
    """The hashlib name of a DKIM a= value (bytes), or None if unknown."""
    constructor = dkim.HASH_ALGORITHMS.get(algorithm)
    return constructor().name if constructor is not None else None


class BodyDigests:
    """The DKIM body digests of one message body, computed when asked.

    ``pieces()`` gives the body (after the blank line, as dkimpy sees it)
    as an iterable of pieces, each time it is called: slices of a body in
    memory (``of_message``) or reads of a spool file. ``digests(wanted)``
    hashes every missing pair in one pass and keeps the results; blocking:
    call it on a worker thread.
    """

    def __init__(self, pieces):
        self._pieces = pieces
        self._known = {}

    @classmethod
    def of_message(cls, message):
        body = split_message(message)[1]
        return cls(lambda: (body[start:start + SLICE] for start in range(0, len(body), SLICE)))

    def digests(self, wanted):
        missing = {pair for pair in wanted if pair not in self._known}
        if missing:
            hashes = BodyHashes(missing)
            for piece in self._pieces():
                hashes.update(piece)
            self._known.update(hashes.digests())
        return {pair: self._known[pair] for pair in wanted}

    def digest(self, canonicalization, name):
        return self.digests({(canonicalization, name)})[(canonicalization, name)]


def header_object(message, **options):
    """A ``dkim.DKIM`` for the header section of ``message`` only, its body
    empty: for signing and verifying with ``BodyDigests``."""
    head, _ = split_message(message)
    try:
        return dkim.DKIM(head + b"\r\n" if head else None, **options)
    except IndexError:
        raise dkim.MessageFormatError("a continuation line before any field") from None


def install():
    """Make dkimpy's body canonicalisation ours (same results, linear)."""
    canonicalization.Simple.canonicalize_body = staticmethod(simple_body)
    canonicalization.Relaxed.canonicalize_body = staticmethod(relaxed_body)


install()
