"""Outbound SMTP: one transaction per (message, destination domain).

``RemoteDelivery.deliver(envelope, message, recipients, domain)`` routes the
domain (``appliance.deliver.mx``), tries its hosts and addresses in order and
answers one ``RecipientResult`` per recipient: 2xx delivered, 4xx deferred,
5xx failed. It never raises for network or DNS trouble: a host that refuses,
times out, fails TLS or greets with an error is skipped for the next one; when
every host failed, each recipient gets a 4xx with the last error.

A connection whose transaction ended in a 2xx stays open ``IDLE_LIMIT``
seconds for the next message to the same host (MAIL straight away, as after
any completed transaction), like Postfix's connection cache: under load a
destination costs one connect, greeting and EHLO (and TLS handshake) per
burst, not per message.

The protocol is our own small client (``SMTPClientProtocol``), not
twisted.mail's ``ESMTPClient``, because of TWISTED-TRAPS:

- T12: the body is normalised and dot-stuffed line by line over the whole
  message before it is cut into blocks: every line ends in CRLF (a bare CR or
  LF becomes CRLF) and every line starting with "." is doubled, wherever a
  16 KiB block boundary falls.
- T13: bytes that follow the 220 reply to STARTTLS are discarded; the session
  starts over under TLS with a new EHLO.
- T14: every wait has a timeout (RFC 5321 §4.5.3.2), from ``Timeouts``.
- A reply is capped (``MAX_REPLY_LINES`` lines, ``MAX_REPLY_BYTES`` bytes,
  ``MAX_LINE`` a line): more is a protocol error, a temporary failure.

There are no smarthost credentials in SPEC §3, so no AUTH is sent.

The route kind (``appliance.deliver.routes``) says where a group goes:
REMOTE by MX (or smarthost), MAILBOX to an edge's ``[relay] mailbox_host``
(no MTA-STS: the operator chose that host, as for a smarthost). The rest is
the same: a mailbox host that is down defers, and the queue retries.
"""

import re
from dataclasses import dataclass

from OpenSSL import SSL
from twisted.internet import defer, endpoints, error, interfaces, protocol, ssl
from twisted.logger import Logger
from zope.interface import implementer

from appliance.address import is_ip
from appliance import events
from appliance.address import quote_local
from appliance.deliver import mtasts
from appliance.deliver.mx import RoutingError
from appliance.deliver.routes import REMOTE
from appliance.net.write import write_now

_log = Logger(namespace="mailappliance.deliver.remote")

events.register("delivery.remote", "a remote MX answered for a recipient (or every host failed)",
                ("queue_id", "recipient", "remote_host", "remote_ip", "tls", "code", "response"))
events.register("delivery.remote.attempt", "a connection to a remote MX failed; the next is tried",
                ("queue_id", "domain", "host", "ip", "error"))

MAX_LINE = 4096            # one reply line (RFC 5321 says 512; be lenient, not unbounded)
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 65536
MAX_ATTEMPTS = 20          # addresses tried per delivery
BLOCK = 16384              # body bytes per transport write
QUIT_WAIT = 10.0           # seconds to wait for the reply to QUIT before closing
# Connection reuse, as Postfix's smtp_connection_cache_time_limit and
# smtp_connection_reuse_time_limit: a connection whose transaction ended in a
# 2xx waits IDLE_LIMIT seconds for the next message to the same host, and is
# not reused once REUSE_LIMIT seconds old.
IDLE_LIMIT = 2.0
REUSE_LIMIT = 300.0
MAX_IDLE = 100             # idle connections kept in all


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 waits, in seconds (tests pass small ones with a Clock)."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0        # EHLO, HELO, STARTTLS, MAIL, RCPT, RSET
    data_init: float = 120.0      # the 354 after DATA
    data_block: float = 180.0     # the transport accepting the next body block
    data_end: float = 600.0       # the reply to the final dot


@dataclass
class RecipientResult:
    """What happened to one recipient.

    ``text`` is the remote reply's text (its lines joined by spaces) when
    ``from_remote``, else our own description (connection refused, DNS ...);
    ``status`` is the RFC 3463 code either way.
    """

    recipient: str
    code: int
    status: str
    text: str
    remote_host: str = ""
    tls: bool = False
    remote_ip: str = ""
    from_remote: bool = True

    @property
    def delivered(self):
        return 200 <= self.code < 300

    @property
    def deferred(self):
        return 400 <= self.code < 500

    @property
    def failed(self):
        return self.code >= 500

    @property
    def response(self):
        return f"{self.code} {self.text}"


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


class _ClientFactory(protocol.Factory):
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


# ---------------------------------------------------------------------------
# Delivery

def _wire_address(address, utf8):
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


def _needs_utf8(address):
    return not address.rpartition("@")[0].isascii()


class RemoteDelivery:
    """Delivers messages to remote domains; see the module docstring.

    ``resolver``: an ``MXResolver``; ``reactor``: clock and TCP connector;
    ``tls_context_factory(hostname, verify) -> connection creator``;
    ``timeouts``: a ``Timeouts``; ``connect(ip, port, factory, timeout)``
    replaces the reactor's TCP connect (tests). ``mta_sts``: an
    ``mtasts.MTASTSPolicies`` to honour recipients' MTA-STS policies (RFC 8461).
    """

    mta_sts = None

    def __init__(self, config, resolver, reactor, tls_context_factory=None,
                 timeouts=None, connect=None):
        self.config = config
        self.resolver = resolver
        self.reactor = reactor
        self.tls_context_factory = tls_context_factory or default_tls_context
        self.timeouts = timeouts or Timeouts()
        self._connect = connect or self._tcp_connect
        self.tls_mode = config.outbound.tls
        self.helo_name = config.server.hostname or "localhost"
        self._idle = {}            # (host, ip, port) -> [(proto, expiry DelayedCall)]
        self._stopped = False

    def _tcp_connect(self, ip, port, factory, timeout):
        endpoint_class = endpoints.TCP6ClientEndpoint if ":" in ip \
            else endpoints.TCP4ClientEndpoint
        return endpoint_class(self.reactor, ip, port, timeout=timeout).connect(factory)

    # -- the public face -----------------------------------------------------

    def deliver(self, envelope, message, recipients, domain, kind=REMOTE):
        """Deferred[list[RecipientResult]], one per recipient, in order;
        ``kind``: the route kind of the group (``appliance.deliver.routes``)."""
        if not recipients:
            return defer.succeed([])
        d = self._deliver(envelope, message, list(recipients), domain, kind)
        d.addErrback(self._internal_error, envelope, recipients)
        return d

    def _internal_error(self, failure, envelope, recipients):
        # A bug must not lose the message: defer it like a network error.
        _log.failure("remote delivery of {queue_id} failed", failure,
                     queue_id=envelope.queue_id)
        results = [RecipientResult(r, 451, "4.3.0", "internal error in remote delivery",
                                   from_remote=False) for r in recipients]
        self._report(envelope, results)
        return results

    @defer.inlineCallbacks
    def _deliver(self, envelope, message, recipients, domain, kind=REMOTE):
        try:
            route = yield (self.resolver.resolve(domain) if kind == REMOTE
                           else self.resolver.resolve(domain, kind))
        except RoutingError as e:
            results = [RecipientResult(r, e.code, e.status, e.text, from_remote=False)
                       for r in recipients]
            self._report(envelope, results)
            return results
        body = wire_body(message)
        addresses, verified = route.addresses(), False
        if self.mta_sts is not None and not route.relay_host:
            policy = yield self.mta_sts.policy_for(domain)
            addresses, verified = mtasts.restrict(policy, addresses, envelope.queue_id, domain)
        last = HostFailure("4.4.1", f"no address to try for {domain}")
        if verified and not addresses:
            last = HostFailure("4.7.5", f"no MX host of {domain} is listed in its MTA-STS "
                                        "policy")
        host = ip = ""
        for host, ip in addresses[:MAX_ATTEMPTS]:
            try:
                replies, tls = yield self._attempt(envelope, body, len(message),
                                                   recipients, host, ip, route.port, verified)
            except HostFailure as failure:
                last = failure
                events.emit("delivery.remote.attempt", queue_id=envelope.queue_id,
                            domain=domain, host=host, ip=ip, error=failure.text)
                continue
            results = [RecipientResult(r, replies[r].code, replies[r].status,
                                       replies[r].text, host, tls, ip,
                                       from_remote=not replies[r].local)
                       for r in recipients]
            self._report(envelope, results)
            return results
        results = [RecipientResult(r, last.code, last.status, last.text, host, False, ip,
                                   from_remote=False) for r in recipients]
        self._report(envelope, results)
        return results

    @staticmethod
    def _report(envelope, results):
        for result in results:
            events.emit("delivery.remote", queue_id=envelope.queue_id,
                        recipient=result.recipient, remote_host=result.remote_host,
                        remote_ip=result.remote_ip, tls=result.tls, code=result.code,
                        response=result.response)

    # -- one host ------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, envelope, body, size, recipients, host, ip, port, verified=False):
        """``({recipient: Reply}, tls)`` from this host, or raise HostFailure.

        An idle connection to the host from an earlier message is used first;
        if it turns out closed before answering anything, a new one is made.
        ``verified``: STARTTLS with a verified certificate is required (MTA-STS).
        """
        key = (host, ip, port, verified)
        proto = self._take_idle(key)
        if proto is not None:
            answered = proto.replies
            try:
                replies = yield self._transaction(proto, envelope, body, size, recipients,
                                                  proto.extensions)
            except HostFailure:
                proto.abort()
                if proto.replies != answered:
                    raise
            else:
                self._done_with(key, proto, replies)
                return replies, proto.tls
        peer = f"{host}[{ip}]" if host != ip else f"[{ip}]"
        factory = _ClientFactory(self.reactor, peer)
        try:
            proto = yield self._connect(ip, port, factory, self.timeouts.connect)
        except Exception as e:        # refused, timed out, unreachable ...
            raise HostFailure("4.4.1", f"connect to {peer}:{port}: {_describe(e)}") from None
        proto.opened_at = self.reactor.seconds()
        try:
            replies = yield self._converse(proto, envelope, body, size, recipients, host,
                                           verified)
        except Exception:
            proto.abort()
            raise
        self._done_with(key, proto, replies)
        return replies, proto.tls

    # -- idle connections ----------------------------------------------------

    def _done_with(self, key, proto, replies):
        """Keep the connection for the next message to this host, or QUIT.

        Kept only after a transaction that ended in a 2xx to the end of data
        (a positive reply for some recipient): the session is then back at
        its start, ready for MAIL.
        """
        if (not self._stopped and proto.usable
                and any(reply.positive for reply in replies.values())
                and self.reactor.seconds() - proto.opened_at < REUSE_LIMIT
                and sum(map(len, self._idle.values())) < MAX_IDLE):
            timer = self.reactor.callLater(IDLE_LIMIT, self._expire, key, proto)
            self._idle.setdefault(key, []).append((proto, timer))
            proto.on_lost = lambda: self._forget_idle(key, proto)
            return
        _quit(proto)

    def _take_idle(self, key):
        """The most recently used idle connection to ``key``, or None."""
        idle = self._idle.get(key)
        while idle:
            proto, timer = idle.pop()
            if timer.active():
                timer.cancel()
            proto.on_lost = None
            if proto.usable:
                if not idle:
                    del self._idle[key]
                return proto
            proto.abort()
        self._idle.pop(key, None)
        return None

    def _forget_idle(self, key, proto):
        """The peer closed an idle connection (or it failed): drop it."""
        idle = self._idle.get(key, [])
        for n, (cached, timer) in enumerate(idle):
            if cached is proto:
                del idle[n]
                if timer.active():
                    timer.cancel()
                break
        if not idle:
            self._idle.pop(key, None)

    def _expire(self, key, proto):
        self._forget_idle(key, proto)
        _quit(proto)

    def stop(self):
        """QUIT every idle connection and keep none from now on (shutdown).

        The Deferred fires once they are all closed."""
        self._stopped = True
        idle, self._idle = self._idle, {}
        gone = []
        for entries in idle.values():
            for proto, timer in entries:
                if timer.active():
                    timer.cancel()
                gone.append(_quit(proto))
        return defer.DeferredList(gone)

    @defer.inlineCallbacks
    def _converse(self, proto, envelope, body, size, recipients, host, verified=False):
        t = self.timeouts
        greeting = yield proto.expect(t.greeting, "receiving the initial server greeting")
        if not greeting.positive:
            raise HostFailure.from_reply(greeting, f"host {proto.peer_name} refused to talk "
                                                   "to me")
        extensions = yield self._hello(proto)
        extensions = proto.extensions = yield self._tls(proto, extensions, host, verified)
        replies = yield self._transaction(proto, envelope, body, size, recipients, extensions)
        return replies

    @defer.inlineCallbacks
    def _hello(self, proto):
        """EHLO (HELO after a 5xx): ``{KEYWORD: argument}`` of the extensions."""
        t = self.timeouts
        proto.command(f"EHLO {self.helo_name}")
        reply = yield proto.expect(t.command, "sending EHLO")
        if reply.positive:
            return _extensions(reply)
        if reply.code >= 500:
            proto.command(f"HELO {self.helo_name}")
            reply = yield proto.expect(t.command, "sending HELO")
            if reply.positive:
                return {}
        raise HostFailure.from_reply(reply, f"host {proto.peer_name} refused HELO/EHLO")

    @defer.inlineCallbacks
    def _tls(self, proto, extensions, host, verified=False):
        """STARTTLS per ``[outbound] tls`` (or required and verified: MTA-STS);
        the extensions of the session to use."""
        required = self.tls_mode == "required" or verified
        if self.tls_mode == "off" and not verified:
            return extensions
        if "STARTTLS" not in extensions:
            if required:
                raise HostFailure("4.7.4", "TLS is required, but was not offered by host "
                                           f"{proto.peer_name}")
            return extensions
        proto.command("STARTTLS")
        reply = yield proto.expect(self.timeouts.command, "sending STARTTLS")
        if reply.code != 220:
            if required:
                raise HostFailure.from_reply(reply, f"host {proto.peer_name} refused STARTTLS")
            return extensions
        try:
            creator = self.tls_context_factory(host, required)
            proto.start_tls(creator)       # drops whatever followed the 220 (T13)
        except Exception as e:
            raise HostFailure("4.7.5", f"cannot start TLS with {proto.peer_name}: "
                                       f"{_describe(e)}") from None
        # The first reply under TLS proves the handshake (and, when required,
        # the certificate check) succeeded; a failure is a lost connection.
        try:
            extensions = yield self._hello(proto)
        except HostFailure as failure:
            if failure.status == "4.4.2":
                raise HostFailure("4.7.5", f"TLS with {proto.peer_name} failed: "
                                           f"{failure.text}") from None
            raise
        proto.tls = True
        return extensions

    @defer.inlineCallbacks
    def _transaction(self, proto, envelope, body, size, recipients, extensions):
        """MAIL, RCPT..., DATA, body: ``{recipient: Reply}`` for all recipients."""
        t = self.timeouts
        replies = _refused_before_mail(proto, envelope, size, recipients, extensions)
        sendable = [r for r in recipients if r not in replies]
        if not sendable:
            return replies
        utf8 = "SMTPUTF8" in extensions
        mail = self._mail_command(envelope, size, sendable, extensions)
        rcpts = [f"RCPT TO:{_wire_address(r, utf8)}" for r in sendable]
        if "PIPELINING" in extensions:
            mail_reply, rcpt_replies, data_reply = yield self._pipelined(proto, mail, rcpts)
        else:
            mail_reply, rcpt_replies, data_reply = yield self._lockstep(proto, mail, rcpts)
        if not mail_reply.positive:
            if mail_reply.code < 500:
                raise HostFailure.from_reply(mail_reply,
                                             f"host {proto.peer_name} said at MAIL FROM")
            replies.update({r: mail_reply for r in sendable})
            return replies
        replies.update(zip(sendable, rcpt_replies))
        accepted = [r for r, reply in zip(sendable, rcpt_replies) if reply.positive]
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920 §3.1: end the DATA the server invited, with nothing in it.
                yield proto.send_body(b"", t.data_block)
                yield proto.expect(t.data_end, "sending the end of an empty DATA")
            return replies
        if data_reply.code == 354:
            yield proto.send_body(body, t.data_block)
            final = yield proto.expect(t.data_end, "sending the end of data")
        elif data_reply.code >= 400:
            final = data_reply
        else:
            final = Reply(451, [f"4.5.0 unexpected reply to DATA from {proto.peer_name}: "
                                f"{data_reply}"], local=True)
        replies.update({r: final for r in accepted})
        return replies

    def _mail_command(self, envelope, size, sendable, extensions):
        utf8 = "SMTPUTF8" in extensions
        mail = f"MAIL FROM:{_wire_address(envelope.sender, utf8)}"
        if "SIZE" in extensions:
            mail += f" SIZE={size}"
        if "8BITMIME" in extensions and envelope.params.get("BODY") == "8BITMIME":
            mail += " BODY=8BITMIME"
        if utf8 and (envelope.params.get("SMTPUTF8") or
                     any(_needs_utf8(a) for a in [envelope.sender] + sendable)):
            mail += " SMTPUTF8"
        return mail

    @defer.inlineCallbacks
    def _pipelined(self, proto, mail, rcpts):
        """RFC 2920: every command in one go, then the replies in order."""
        t = self.timeouts
        proto.command(mail, *rcpts, "DATA")
        mail_reply = yield proto.expect(t.command, "sending MAIL FROM")
        rcpt_replies = []
        for _line in rcpts:
            rcpt_replies.append((yield proto.expect(t.command, "sending RCPT TO")))
        data_reply = yield proto.expect(t.data_init, "sending DATA")
        return mail_reply, rcpt_replies, data_reply

    @defer.inlineCallbacks
    def _lockstep(self, proto, mail, rcpts):
        """One command, one reply; DATA only when a recipient was accepted."""
        t = self.timeouts
        proto.command(mail)
        mail_reply = yield proto.expect(t.command, "sending MAIL FROM")
        if not mail_reply.positive:
            return mail_reply, [], None
        rcpt_replies = []
        for line in rcpts:
            proto.command(line)
            rcpt_replies.append((yield proto.expect(t.command, "sending RCPT TO")))
        data_reply = None
        if any(reply.positive for reply in rcpt_replies):
            proto.command("DATA")
            data_reply = yield proto.expect(t.data_init, "sending DATA")
        return mail_reply, rcpt_replies, data_reply


def _quit(proto):
    """QUIT and close; a Deferred that fires once the connection is gone."""
    if proto._closed:
        proto.on_lost = None
        return defer.succeed(None)
    gone = defer.Deferred()
    proto.on_lost = lambda: gone.callback(None)
    proto.command("QUIT")       # no need to wait for its reply
    proto.close()
    return gone


def _refused_before_mail(proto, envelope, size, recipients, extensions):
    """``{recipient: Reply}`` for those this host cannot take at all (SIZE, SMTPUTF8)."""
    limit = extensions.get("SIZE", "")
    if limit.isdigit() and 0 < int(limit) < size:
        reply = Reply(552, [f"5.3.4 message size {size} exceeds the limit {limit} "
                            f"of {proto.peer_name}"], local=True)
        return {r: reply for r in recipients}
    if "SMTPUTF8" in extensions:
        return {}
    if _needs_utf8(envelope.sender):
        return {r: _no_utf8(proto) for r in recipients}
    return {r: _no_utf8(proto) for r in recipients if _needs_utf8(r)}


def _no_utf8(proto):
    return Reply(553, [f"5.6.7 SMTPUTF8 is required, but was not offered by host "
                       f"{proto.peer_name}"], local=True)


def _extensions(reply):
    """``{KEYWORD: argument text}`` from an EHLO reply (its first line is the greeting)."""
    found = {}
    for line in reply.lines[1:]:
        keyword, _, argument = line.partition(" ")
        if keyword:
            found[keyword.upper()] = argument.strip()
    return found


def _describe(exc):
    if isinstance(exc, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, (error.TimeoutError, defer.TimeoutError)):
        return "Connection timed out"
    text = str(exc).strip() or type(exc).__name__
    return _UNPRINTABLE.sub(" ", text)[:200]
