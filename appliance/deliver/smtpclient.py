"""The SMTP client protocol that outbound delivery speaks.

``SMTPClientProtocol`` reads replies and writes commands and the body, with a
deadline on every wait; the conversation (EHLO, STARTTLS, MAIL, RCPT, DATA,
connection reuse) is ``appliance.deliver.remote``'s.

It is our own small client, not twisted.mail's ``ESMTPClient``, because of
TWISTED-TRAPS:

- T12: the body is normalised and dot-stuffed line by line over the whole
  message before it is cut into blocks: every line ends in CRLF (a bare CR or
  LF becomes CRLF) and every line starting with "." is doubled, wherever a
  16 KiB block boundary falls.
- T13: bytes that follow the 220 reply to STARTTLS are discarded; the session
  starts over under TLS with a new EHLO.
- T14: every wait has a timeout (RFC 5321 §4.5.3.2), from ``Timeouts``.
- A reply is capped (``MAX_REPLY_LINES`` lines, ``MAX_REPLY_BYTES`` bytes,
  ``MAX_LINE`` a line): more is a protocol error, a temporary failure.
"""

import re
from dataclasses import dataclass

from OpenSSL import SSL
from twisted.internet import defer, error, interfaces, protocol, ssl
from zope.interface import implementer

from appliance.address import is_ip, quote_local
from appliance.net.write import write_now

MAX_LINE = 4096            # one reply line (RFC 5321 says 512; be lenient, not unbounded)
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 65536
BLOCK = 16384              # body bytes per transport write


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 waits, in seconds (tests pass small ones with a Clock)."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0        # EHLO, HELO, STARTTLS, MAIL, RCPT, RSET
    data_init: float = 120.0      # the 354 after DATA
    data_block: float = 180.0     # the transport accepting the next body block
    data_end: float = 600.0       # the reply to the final dot



# ---------------------------------------------------------------------------
# Replies

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class Reply:
    code: int
    lines: list          # the text after "ddd-" / "ddd " of each line, printable only
    local: bool = False  # made up here (SIZE, SMTPUTF8 ...), not said by the server

    @property
    def text(self):
        return " ".join(line for line in self.lines if line) or ""

    @property
    def status(self):
        """The enhanced status code the reply carries, or one from its class."""
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        if match and match.group(1) == str(self.code)[0]:
            return f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
        return f"{str(self.code)[0]}.0.0"

    @property
    def positive(self):
        return 200 <= self.code < 300

    def __str__(self):
        return f"{self.code} {self.text}"


class HostFailure(Exception):
    """This host cannot take the message now: try the next one.

    ``code`` is always 4xx (the message is deferred if no host works).
    """

    def __init__(self, status, text, code=451):
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code

    @classmethod
    def from_reply(cls, reply, context):
        # A 5xx here (greeting, EHLO...) says nothing about the recipients:
        # like Postfix (smtp_skip_5xx_greeting) we treat it as temporary.
        status = "4" + reply.status[1:]
        code = reply.code if 400 <= reply.code < 500 else 451
        return cls(status, f"{context}: {reply}", code)


# ---------------------------------------------------------------------------
# The protocol: reads replies, writes commands and the body, keeps time.

@implementer(interfaces.IPushProducer)
class SMTPClientProtocol(protocol.Protocol):
    """Replies in, commands out; the conversation itself is ``RemoteDelivery``'s.

    ``command(line)`` writes one command; ``expect(timeout, what)`` returns a
    Deferred for the next reply. Replies are matched to commands in order
    (pipelining); a reply nobody asked for is a protocol error. Every failure
    (timeout, lost connection, malformed or oversized reply) fails the
    pending and all later ``expect``s with a ``HostFailure``.
    """

    def __init__(self, clock, peer_name):
        self.clock = clock
        self.peer_name = peer_name        # "host[ip]" for messages
        self.tls = False                  # the session is under TLS
        self._buffer = b""
        self._lines = []                  # lines of the reply being read
        self._size = 0
        self._ready = []                  # replies read, not yet expected
        self._waiting = None              # (Deferred, DelayedCall, what)
        self._owed = 1                    # replies we may receive: the greeting
        self._receivable = 0              # ... of them, in the bytes being read
        self._failure = None
        self._closed = False
        self._body = None                 # the body being written, if any
        self._paused = False
        self._block_timer = None
        self.replies = 0                  # replies received so far
        self.extensions = {}              # of the session in use (RemoteDelivery's)
        self.opened_at = None
        self.on_lost = None               # called once the connection is gone

    # -- connection ----------------------------------------------------------

    def connectionLost(self, reason=None):
        self._closed = True
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()
        if self._failure is None:
            why = "lost connection"
            if reason is not None and reason.check(SSL.Error):
                why = "TLS handshake failed"
            self._fail(HostFailure("4.4.2", f"{why} with {self.peer_name}"), close=False)
        self._stop_body()

    def close(self):
        if not self._closed:
            self.transport.loseConnection()

    @property
    def usable(self):
        """Still connected, nothing failed, no reply or body outstanding."""
        return (not self._closed and self._failure is None and self._owed == 0
                and self._body is None and not self._ready and not self._buffer)

    def abort(self):
        if not self._closed:
            self._closed = True
            self.transport.abortConnection()

    def _fail(self, failure, close=True):
        if self._failure is None:
            self._failure = failure
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            d, timer, _what = waiting
            if timer.active():
                timer.cancel()
            d.errback(self._failure)
        self._stop_body()
        if close:
            self.abort()

    # -- replies -------------------------------------------------------------

    def dataReceived(self, data):
        # A command written while these bytes are read has not left yet: no
        # reply to it can be among them (nor in what is still buffered).
        self._receivable = self._owed
        self._buffer += data
        while self._failure is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    self._protocol_error("reply line too long")
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            if len(line) > MAX_LINE:
                self._protocol_error("reply line too long")
                return
            self._line_received(line[:-1] if line.endswith(b"\r") else line)

    def _line_received(self, line):
        match = _REPLY_LINE.fullmatch(line)
        if not match or (self._lines and int(match.group(1)) != self._lines[0][0]):
            self._protocol_error("malformed reply")
            return
        self._size += len(line)
        if len(self._lines) >= MAX_REPLY_LINES or self._size > MAX_REPLY_BYTES:
            self._protocol_error("reply too long")
            return
        text = _UNPRINTABLE.sub("", match.group(3).decode("utf-8", "replace")).strip()
        self._lines.append((int(match.group(1)), text))
        if match.group(2) != b"-":
            reply = Reply(self._lines[0][0], [t for _code, t in self._lines])
            self._lines, self._size = [], 0
            self._reply_received(reply)

    def _reply_received(self, reply):
        if self._receivable <= 0:
            self._protocol_error(f"unexpected reply {reply}")
            return
        self._owed -= 1
        self._receivable -= 1
        self.replies += 1
        if self._waiting is not None:
            d, timer, _what = self._waiting
            self._waiting = None
            timer.cancel()
            d.callback(reply)
        else:
            self._ready.append(reply)

    def _protocol_error(self, what):
        self._fail(HostFailure("4.5.0", f"{what} from {self.peer_name}"))

    def expect(self, timeout, what):
        """Deferred[Reply] for the next reply; ``what`` names it in errors."""
        if self._ready:
            return defer.succeed(self._ready.pop(0))
        if self._failure is not None:
            return defer.fail(self._failure)
        d = defer.Deferred()
        timer = self.clock.callLater(timeout, self._timed_out, what)
        self._waiting = (d, timer, what)
        return d

    def _timed_out(self, what):
        self._fail(HostFailure("4.4.2", f"conversation with {self.peer_name} timed out "
                                        f"while {what}"))

    def discard_input(self):
        """Forget every byte received and not yet read (T13, after STARTTLS's 220)."""
        self._buffer = b""
        self._lines, self._size = [], 0
        self._ready = []
        self._owed = self._receivable = 0

    # -- commands ------------------------------------------------------------

    def command(self, *lines):
        """Write command lines (str, no CRLF) in one go; a reply is owed for each."""
        if self._failure is not None or self._closed:
            return
        self._owed += len(lines)
        write_now(self.transport, "".join(line + "\r\n" for line in lines).encode("utf-8"))

    def start_tls(self, connection_creator):
        self.discard_input()
        self.transport.startTLS(connection_creator)

    # -- the body (IPushProducer: the transport tells us when it is full) ---

    def send_body(self, data, timeout):
        """Write ``data`` (already stuffed) and the final dot, block by block.

        Fires when the dot is written. While the transport is full, each wait
        for it to drain may last ``timeout`` seconds (the data block timeout).
        """
        if self._failure is not None:
            return defer.fail(self._failure)
        if len(data) <= BLOCK:          # the usual message: one write, no flow control
            self._owed += 1
            write_now(self.transport, bytes(data) + b".\r\n")
            return defer.succeed(None)
        body = self._body = _Body(memoryview(data), timeout, defer.Deferred())
        self._paused = False
        self.transport.registerProducer(self, True)
        self._pump()
        return body.done

    def _pump(self):
        body = self._body
        while body is not None and not self._paused and body.offset < len(body.data):
            block = body.data[body.offset:body.offset + BLOCK]
            body.offset += len(block)
            self.transport.write(bytes(block))
        if body is not None and self._body is body and not self._paused:
            self._body = None
            self.transport.unregisterProducer()
            self._owed += 1
            self.transport.write(b".\r\n")
            body.done.callback(None)

    def pauseProducing(self):
        self._paused = True
        if self._body is not None and self._block_timer is None:
            self._block_timer = self.clock.callLater(self._body.timeout, self._block_timeout)

    def resumeProducing(self):
        self._paused = False
        self._cancel_block_timer()
        self._pump()

    def stopProducing(self):
        self._stop_body()

    def _block_timeout(self):
        self._block_timer = None
        self._fail(HostFailure("4.4.2", f"conversation with {self.peer_name} timed out "
                                        "while sending the message body"))

    def _cancel_block_timer(self):
        if self._block_timer is not None:
            if self._block_timer.active():
                self._block_timer.cancel()
            self._block_timer = None

    def _stop_body(self):
        self._cancel_block_timer()
        body, self._body = self._body, None
        if body is not None:
            if not self._closed:
                self.transport.unregisterProducer()
            body.done.errback(self._failure or HostFailure(
                "4.4.2", f"lost connection with {self.peer_name} while sending the message"))


@dataclass
class _Body:
    data: memoryview
    timeout: float
    done: defer.Deferred
    offset: int = 0


class ClientFactory(protocol.Factory):
    def __init__(self, clock, peer_name):
        self.clock = clock
        self.peer_name = peer_name

    def buildProtocol(self, addr):
        proto = SMTPClientProtocol(self.clock, self.peer_name)
        proto.factory = self
        return proto


# ---------------------------------------------------------------------------
# The body on the wire (T12)

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT_LINE = re.compile(rb"^\.", re.MULTILINE)


def wire_body(message):
    """``message`` as DATA content: CRLF lines only, dot-stuffed, CRLF-terminated.

    Done over the whole message at once so no line can be split between two
    blocks (T12); a bare CR or LF becomes CRLF, never travels raw. The final
    ``.CRLF`` is not included.
    """
    crlf = message.count(b"\r\n")
    if crlf == message.count(b"\n") == message.count(b"\r"):
        data = message                  # every line ends in CRLF already (the usual)
    else:
        data = _LINE_END.sub(b"\r\n", message)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if b"\n." not in data and not data.startswith(b"."):
        return data                     # no line to stuff
    return _DOT_LINE.sub(b"..", data)


# ---------------------------------------------------------------------------
# TLS

@implementer(interfaces.IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """Opportunistic TLS: encrypt, send SNI, accept any certificate (RFC 7435)."""

    def __init__(self, hostname):
        self.hostname = hostname
        self._context = ssl.CertificateOptions().getContext()

    def clientConnectionForTLS(self, tls_protocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        if self.hostname and not is_ip(self.hostname):   # SNI takes names only
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        return connection


def default_tls_context(hostname, verify, trust_root=None):
    """The TLS connection creator for ``hostname``.

    ``verify``: the certificate must chain to ``trust_root`` (default the
    system store) and name ``hostname`` (service-identity checks it).
    """
    if not verify:
        return _UnverifiedTLS(hostname)
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root or ssl.platformTrust())



def wire_address(address, utf8):
    """``<local@domain>`` for the wire: A-label domain unless SMTPUTF8 is in use."""
    if not address:
        return "<>"
    local, _, domain = address.rpartition("@")
    if not utf8 and not domain.startswith("["):
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            pass      # kept as is; the local part decides whether SMTPUTF8 is needed
    return f"<{quote_local(local)}@{domain}>"


def needs_utf8(address):
    return not address.rpartition("@")[0].isascii()


def quit_session(proto):
    """QUIT and close; a Deferred that fires once the connection is gone."""
    if proto._closed:
        proto.on_lost = None
        return defer.succeed(None)
    gone = defer.Deferred()
    proto.on_lost = lambda: gone.callback(None)
    proto.command("QUIT")       # no need to wait for its reply
    proto.close()
    return gone



def ehlo_extensions(reply):
    """``{KEYWORD: argument text}`` from an EHLO reply (its first line is the greeting)."""
    found = {}
    for line in reply.lines[1:]:
        keyword, _, argument = line.partition(" ")
        if keyword:
            found[keyword.upper()] = argument.strip()
    return found



def describe_error(exc):
    if isinstance(exc, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, (error.TimeoutError, defer.TimeoutError)):
        return "Connection timed out"
    text = str(exc).strip() or type(exc).__name__
    return _UNPRINTABLE.sub(" ", text)[:200]
