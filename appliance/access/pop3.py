"""POP3 (RFC 1939) over the Maildirs: STLS on 110 (RFC 2595), implicit TLS on 995.

The protocol class stays a ``twisted.mail.pop3.POP3`` (greeting, responses,
the idle-timeout mixin), but the line handling and every command are our
own: the stock ones carry the holes listed as T21 in TWISTED-TRAPS.md, each
named where it is closed:

- no STLS at all, and USER/PASS accepted in plaintext: here STLS discards
  whatever was pipelined after it and starts the session over, and USER,
  PASS and AUTH are refused (and not advertised) until TLS is on;
- unlimited PASS attempts: three failed logins end the connection;
- missing or bad arguments crash the handler (``USER``, ``TOP 1``) or do
  something else entirely (``DELE 0`` marks the *last* message): every
  argument is checked and answered with ``-ERR``;
- CAPA advertises joke capabilities (CELERITY, AUSPEX, POTENCE) and a
  misspelt PIPELINE: here only what is implemented;
- no maildrop lock: a second session of the same user gets ``-ERR [IN-USE]``;
- RETR converts and dot-stuffs per 16 KiB chunk, so a ``.`` line at a chunk
  boundary goes out unstuffed and ends the message early (and CRLF becomes
  CR CR LF): here the whole message is stuffed at once;
- pipelined commands run while a login is still being checked: here one
  command at a time, in order, reading paused while one is pending.

A session sees its INBOX as it was at login (``Maildrop``): mail delivered
later appears in the next session, and DELE only marks. The marked messages
are removed at QUIT; a connection that drops without QUIT deletes nothing.
UIDL values come from the shared UID list of ``appliance.access.folders``
(UID and UIDVALIDITY, like Dovecot's default), the same in every session
and across restarts.
"""

import re
from io import BytesIO

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance import events
from appliance.access.folders import FolderMissing, MessageGone
from appliance.auth.accounts import BadCredentials
from appliance.auth.outcome import UNAVAILABLE, LoginRecorder
from appliance.auth.sasl import Aborted, Challenge, Malformed, encode_challenge, respond
from appliance.envelope import new_session_id
from appliance.auth.sasl import fingerprint
from appliance.defence.stages import BANNED_TEXT, LIMIT_KIND, REFUSED_TEXT
from appliance.net.gate import DENIED, GatedFactory
from appliance.net.peer import peer_ip
from appliance.message import header_safe
from appliance.net.session import LineSession
from appliance.net.tls import TLSError, connection_info

COMMAND_LINE_LIMIT = 512        # octets with CRLF; RFC 2449 asks for 255, passwords run longer
AUTH_LINE_LIMIT = 12288         # a SASL line (RFC 5034 §4 exempts it; OAuth tokens are long)
MAX_AUTH_FAILURES = 3           # per connection; the auditor bans across connections
CRLF = b"\r\n"

_VERB = re.compile(rb"[A-Za-z]{1,16}\Z")
_NUMBER = re.compile(rb"[0-9]{1,10}\Z")
_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}\Z")

AUTHORIZATION = frozenset({"CAPA", "STLS", "USER", "PASS", "AUTH", "QUIT"})
TRANSACTION = frozenset({"CAPA", "STAT", "LIST", "UIDL", "TOP", "RETR", "DELE", "RSET",
                         "NOOP", "QUIT"})
NOT_OFFERED = frozenset({"APOP", "RPOP", "LAST", "XTND"})

_log = Logger()

for _name, _description, _fields in (
    ("pop3.connect", "a POP3 client connected", ("session", "peer_ip", "peer_port", "listener")),
    ("pop3.tls", "a TLS handshake finished after STLS (or at connect: implicit)",
     ("session", "peer_ip", "listener", "version", "cipher", "implicit")),
    ("pop3.stls.discarded", "input pipelined after STLS was thrown away",
     ("session", "peer_ip", "octets")),
    ("pop3.login", "a POP3 user logged in and the maildrop was opened",
     ("session", "peer_ip", "listener", "account", "mechanism", "messages", "octets")),
    ("pop3.retrieve", "a message was sent to a POP3 client (RETR)",
     ("session", "peer_ip", "account", "uidl", "size")),
    ("pop3.limit", "a POP3 command or connection refused or closed by a limit "
     "(auth_failures, in_use, max_errors, timeout, line_flood, ...)",
     ("session", "peer_ip", "kind")),
    ("pop3.disconnect", "a POP3 connection ended; deleted counts messages removed at QUIT",
     ("session", "peer_ip", "account", "duration", "retrieved", "deleted")),
):
    events.register(_name, _description, _fields)



class Refusal(Exception):
    """A command answered with ``-ERR text``; ``kind`` counts it as a protocol
    error (None: a normal negative answer, e.g. "no such message")."""

    def __init__(self, text, kind=None):
        super().__init__(text)
        self.text = text
        self.kind = kind


# -- message text ---------------------------------------------------------------------

def _normalised(data):
    """CRLF line ends throughout (the store already gives CRLF; LF-only
    input is converted too), ending with CRLF unless empty."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(CRLF):
        data += CRLF
    return data


def dot_stuffed(data):
    """``data`` as a POP3 multi-line body: CRLF lines, a ``.`` doubled at the
    start of every line, and the terminating ``.`` line.

    Done on the whole message, never per chunk: stock POP3 stuffs each
    16 KiB read separately and so misses a ``.`` that starts a chunk.
    """
    data = _normalised(data)
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def top_of(data, lines):
    """The header block, the blank line and the first ``lines`` body lines."""
    data = _normalised(data)
    if data.startswith(CRLF):
        end = 2
    else:
        blank = data.find(b"\r\n\r\n")
        end = len(data) if blank < 0 else blank + 4
    for _ in range(lines):
        following = data.find(CRLF, end)
        if following < 0:
            return data
        end = following + 2
    return data[:end]


# -- the maildrop: INBOX as one session sees it ----------------------------------------

class Maildrop:
    """The messages of a user's INBOX at login, numbered from 1.

    DELE marks, RSET unmarks, ``commit()`` (QUIT) removes the marked
    messages and flags the retrieved ones ``\\Seen`` (as Dovecot does).
    Messages delivered after login are not shown; a message removed
    meanwhile by IMAP answers ``-ERR`` when read.
    """

    def __init__(self, folder, messages=(), uidvalidity=0):
        self.folder = folder
        self.messages = tuple(messages)
        self.uidvalidity = uidvalidity
        self.deleted = set()        # message numbers marked by DELE
        self.retrieved = set()      # message numbers sent by RETR

    def __len__(self):
        return len(self.messages)

    def message(self, number):
        """The Message numbered ``number``; Refusal if none or deleted."""
        if not 1 <= number <= len(self.messages):
            raise Refusal(f"no such message, only {len(self.messages)} in maildrop")
        if number in self.deleted:
            raise Refusal(f"message {number} already deleted")
        return self.messages[number - 1]

    def live(self):
        """``(number, Message)`` of every message not marked deleted."""
        return [(n, m) for n, m in enumerate(self.messages, 1) if n not in self.deleted]

    def stat(self):
        live = self.live()
        return len(live), sum(m.size for _, m in live)

    def uidl(self, message):
        """A unique-id (RFC 1939 §7): the UID and the folder's UIDVALIDITY."""
        return f"{message.uid:08X}{self.uidvalidity:08X}"

    def read(self, message):
        return self.folder.read(message)

    def delete(self, number):
        self.message(number)
        self.deleted.add(number)

    def undelete(self):
        self.deleted.clear()

    def commit(self):
        """Deferred[int]: remove the marked messages (the UPDATE state); fires
        with how many were removed."""
        uids = [self.messages[n - 1].uid for n in sorted(self.deleted)]
        seen = [self.messages[n - 1].uid for n in sorted(self.retrieved - self.deleted)]
        d = defer.succeed([])
        if uids:
            d = self.folder.expunge(uids)
        if seen:
            d.addCallback(self._flag_seen, seen)
        d.addCallback(len)
        return d

    def _flag_seen(self, removed, uids):
        d = self.folder.store(uids, ["\\Seen"], "add")
        d.addErrback(lambda f: _log.failure("could not flag retrieved messages", f))
        d.addCallback(lambda _: removed)
        return d


class _Sender(basic.FileSender):
    """FileSender that reports progress, so a slow reader keeps its session
    but one that stops reading is timed out."""

    def __init__(self, progress):
        self.progress = progress

    def resumeProducing(self):
        self.progress()
        basic.FileSender.resumeProducing(self)




def _number(arg, what="message number"):
    if not _NUMBER.match(arg):
        raise Refusal(f"{what} expected", "syntax")
    return int(arg)


# -- the protocol ---------------------------------------------------------------------

@implementer(IHandshakeListener)
class POP3Session(LineSession, pop3.POP3):
    """One POP3 session (``POP3Factory`` builds it).

    ``state`` keeps the stock meaning: "COMMAND", or "AUTH" while a SASL
    exchange waits for the client's next line. ``mbox`` is the Maildrop once
    logged in (the TRANSACTION state), None before.
    """

    protocol_label = "POP3"
    # The transport is paused as soon as an answer is pending (SMTP waits for
    # PAUSE_INPUT octets): tests/test_pop3.py checks this.
    pause_input = None

    def __init__(self, factory):
        super().__init__()              # LineSession (pop3.POP3 has no __init__)
        self.factory = factory
        self.config = factory.config
        self.clock = factory.clock
        # TimeoutMixin's setTimeout(None) overwrites timeOut: keep the setting apart.
        self.idle_timeout = self.config.limits.pop3_timeout
        self.session_id = new_session_id()
        self.peer_ip = ""
        self.tls = factory.implicit_tls
        self.account = None
        self.mbox = None
        self.started = 0.0
        self.deleted = 0
        self._user = None
        self._sasl = None
        self._sender = None
        self.logins = LoginRecorder(self)
        self._errors = 0

    # -- connection life ----------------------------------------------------

    def callLater(self, period, func):
        """TimeoutMixin's timer, on the injected clock."""
        return self.clock.callLater(period, func)

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.peer_ip = peer_ip(peer)
        self.started = self.clock.seconds()
        self.emit("pop3.connect", peer_port=getattr(peer, "port", 0),
                  listener=self.factory.listener)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._close_with(refusal)
            return
        # No APOP timestamp: APOP needs the clear-text password on the server.
        self.successResponse(f"{self.config.server.hostname} POP3 ready")
        self.setTimeout(self.idle_timeout)

    def connectionLost(self, reason=protocol.connectionDone):
        self._closing = True
        self.setTimeout(None)
        self._stop_sender()
        self._unlock()
        self.factory.release(self)
        self.emit("pop3.disconnect", account=self.account.address if self.account else "",
                  duration=round(self.clock.seconds() - self.started, 3),
                  retrieved=len(self.mbox.retrieved) if self.mbox else 0,
                  deleted=self.deleted)

    def _unlock(self):
        if self.mbox is not None:
            self.mbox.folder.unlock(self)

    def emit(self, name, **fields):
        """A structured event about this session (session id and peer IP added)."""
        events.emit(name, session=self.session_id, peer_ip=self.peer_ip, **fields)

    def successResponse(self, message=""):
        if not self._closing:
            text = str(message).encode("utf-8") if not isinstance(message, bytes) else message
            self.transport.write(b"+OK " + text + CRLF if text else b"+OK" + CRLF)

    def failResponse(self, message=b""):
        if not self._closing:
            super().failResponse(message)

    def defence_close(self):
        """A ban of this client's network ends the session (SPEC §4)."""
        self.emit("pop3.limit", kind="banned")
        self._close_with(BANNED_TEXT)

    def _close_with(self, text):
        self.failResponse(text)
        self._lose()

    def _lose(self):
        self.setTimeout(None)
        self._close_transport()

    def timeoutConnection(self):
        """Idle for ``[limits] pop3_timeout``; also a reader that stopped
        reading in the middle of a message (its buffer will not drain, so
        the connection is aborted)."""
        self.emit("pop3.limit", kind="timeout")
        if self._sender is not None:
            self._closing = True
            self._stop_sender()
            self.transport.abortConnection()
            return
        self._close_with("Disconnected for inactivity")

    def _stop_sender(self):
        sender, self._sender = self._sender, None
        if sender is not None and sender.deferred is not None:
            sender.file = None
            sender.stopProducing()

    # -- input: the hooks of LineSession (appliance.net.session) --------------

    def _line_limit(self):
        if self.state == "AUTH" or (self.tls and self.mbox is None):
            return AUTH_LINE_LIMIT
        return COMMAND_LINE_LIMIT

    def _dispatch(self, line):
        if self.state == "AUTH":
            if not (line.too_long or line.bare):
                return self._sasl_line(line.data)
            self._end_sasl()
        if line.too_long:
            return self._overlong_line(line)
        if line.bare:
            return self._error("Bare CR or LF in a command line", "bare_cr_lf")
        return self.state_COMMAND(line.data)

    def _arm_timeout(self):
        self.setTimeout(self.idle_timeout)

    def _disarm_timeout(self):
        if self._sender is None:        # a transfer keeps its own progress timer
            self.setTimeout(None)       # otherwise the wait is ours, not the client's

    def _input_flood(self):
        self.emit("pop3.limit", kind="pipelined_input")
        self._close_with("Too much pipelined input")

    def _reply_internal_error(self):
        self.failResponse("[SYS/TEMP] Internal error, try again later")

    def _unfinished_line(self):
        """A line still without CRLF is already too long: answer at once,
        keep discarding, give up on a client that never ends it."""
        if not self._framer.overflowing:
            return
        if self.state == "AUTH":
            self._end_sasl()
        self._answer_overflow()

    def _line_too_long(self, octets):
        return self._error("Line too long", "long_line")

    def _line_flood(self):
        self.emit("pop3.limit", kind="line_flood")
        self._close_with("Line too long, closing")

    def _error(self, text, kind):
        """A protocol error: answered, counted, the session ended at max_errors."""
        self.failResponse(text)
        self._errors += 1
        if self._errors >= self.config.limits.max_errors and not self._closing:
            self.emit("pop3.limit", kind="max_errors")
            self._close_with("Too many errors, closing")

    def state_COMMAND(self, line):
        """One command line: verb, then arguments checked by its handler
        (stock: ``processCommand(*line.split())`` and a TypeError for a
        missing argument, T21)."""
        verb, _, rest = line.partition(b" ")
        name = verb.upper().decode("ascii") if _VERB.match(verb) else ""
        allowed = TRANSACTION if self.mbox is not None else AUTHORIZATION
        try:
            if name in allowed:
                return getattr(self, "do_" + name)(rest)
            if name in AUTHORIZATION | TRANSACTION:
                raise Refusal(f"{name} is not valid in this state", "sequence")
            if name in NOT_OFFERED:
                raise Refusal(f"{name} is not supported", "bad_command")
            raise Refusal("Unknown command", "bad_command")
        except Refusal as refusal:
            if refusal.kind is None:
                self.failResponse(refusal.text)
                return None
            return self._error(refusal.text, refusal.kind)

    @staticmethod
    def _no_arguments(rest):
        if rest.strip(b" "):
            raise Refusal("No arguments expected", "syntax")

    # -- capabilities (RFC 2449) ------------------------------------------------

    def listCapabilities(self):
        """Only what this server does (stock: CELERITY, AUSPEX, POTENCE,
        PIPELINE, and USER in the clear, T21)."""
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.mbox is None:
            if self.tls:
                caps.append(b"USER")
                caps.append(("SASL " + " ".join(self.factory.mechanisms.names())).encode())
            elif self._stls_offered():
                caps.append(b"STLS")
        caps.append(b"IMPLEMENTATION mailappliance")
        return caps

    def do_CAPA(self, rest):
        self._no_arguments(rest)
        self._write_lines("Capability list follows", self.listCapabilities())

    def _write_lines(self, first, lines):
        """``+OK first``, the lines, the terminating dot, in one write."""
        out = [b"+OK " + first.encode("utf-8") + CRLF]
        out.extend(line + CRLF for line in lines)
        out.append(b"." + CRLF)
        if not self._closing:
            self.transport.writeSequence(out)

    # -- STLS (RFC 2595) ---------------------------------------------------------

    def _stls_offered(self):
        return self.factory.tls is not None and not self.factory.implicit_tls

    def do_STLS(self, rest):
        self._no_arguments(rest)
        if self.tls:
            raise Refusal("Already under TLS", "sequence")
        if not self._stls_offered():
            raise Refusal("STLS is not available here", "bad_command")
        try:
            tls = self.factory.tls
            tls.context                 # a reload failing for good: say so now
        except TLSError:
            _log.failure("no TLS context for STLS")
            self.failResponse("[SYS/TEMP] TLS is not available now")
            return
        if not ITLSTransport.providedBy(self.transport):
            self.failResponse("[SYS/TEMP] TLS is not available now")
            return
        self._discard_pipelined()
        self.successResponse("Begin TLS negotiation")
        self.transport.startTLS(tls)
        self._reset_for_tls()

    def _discard_pipelined(self):
        """What came after STLS in the same read was sent in the clear and
        must never run under TLS (RFC 2595 §4; the SMTP T1 hole)."""
        octets = self._discard_input()
        if octets:
            self.emit("pop3.stls.discarded", octets=octets)

    def _reset_for_tls(self):
        """The session starts over: nothing said in the clear carries over."""
        self.tls = True
        self._user = None
        self._sasl = None
        self.state = "COMMAND"

    def handshakeCompleted(self):
        version, cipher = connection_info(self.transport)
        self.emit("pop3.tls", listener=self.factory.listener, version=version, cipher=cipher,
                  implicit=self.factory.implicit_tls)

    # -- USER / PASS ----------------------------------------------------------------

    def _require_tls(self):
        """RFC 2595 §4: no password in the clear (stock accepts it, T21)."""
        if not self.tls:
            raise Refusal("[AUTH] TLS required: use STLS first", "auth_before_tls")

    def do_USER(self, rest):
        self._require_tls()
        name = rest.strip(b" ")
        if not name:
            raise Refusal("USER needs a name", "syntax")
        try:
            self._user = name.decode("utf-8")
        except UnicodeDecodeError:
            raise Refusal("User name is not UTF-8", "syntax") from None
        self.successResponse("Send PASS")

    def do_PASS(self, rest):
        self._require_tls()
        if self._user is None:
            raise Refusal("USER first", "sequence")
        user, self._user = self._user, None
        try:
            password = rest.decode("utf-8")    # all of it: passwords may hold spaces
        except UnicodeDecodeError:
            password = None
        if not password:
            d = defer.fail(BadCredentials("empty or non-UTF-8 password"))
        else:
            d = defer.maybeDeferred(self.factory.mechanisms.accounts.authenticate,
                                    user, password)
        secret = fingerprint(user, password) if password else None
        d.addCallbacks(self._authenticated, self._auth_failed,
                       callbackArgs=("USER",), errbackArgs=("USER", user, secret))
        return d

    # -- AUTH (RFC 5034) ------------------------------------------------------------

    def do_AUTH(self, rest):
        self._require_tls()
        words = rest.split(b" ") if rest else []
        if not words:
            # RFC 1734 clients ask for the list with a bare AUTH.
            names = [n.encode("ascii") for n in self.factory.mechanisms.names()]
            self._write_lines("Supported SASL mechanisms", names)
            return None
        if len(words) > 2 or not all(words) or not _MECHANISM.match(words[0]):
            raise Refusal("AUTH syntax: AUTH mechanism [initial-response]", "syntax")
        mechanism = self.factory.mechanisms.create(words[0].decode("ascii"))
        if mechanism is None:
            raise Refusal("Unsupported SASL mechanism", "bad_parameter")
        self._user = None
        self._sasl = mechanism
        return self._sasl_line(words[1] if len(words) == 2 else None)

    def _sasl_line(self, line):
        return respond(self._sasl, line).addCallbacks(self._sasl_next, self._sasl_failed)

    def _sasl_next(self, result):
        if isinstance(result, Challenge):
            self.state = "AUTH"
            if not self._closing:
                self.transport.write(b"+ " + encode_challenge(result.data) + CRLF)
            return None
        mechanism = self._end_sasl()
        return self._authenticated(result, mechanism.name)

    def _sasl_failed(self, failure):
        mechanism = self._end_sasl()
        if failure.check(Aborted):
            self.failResponse("Authentication cancelled")
            return None
        return self._auth_failed(failure, mechanism.name, mechanism.identity,
                                 mechanism.fingerprint)

    def _end_sasl(self):
        mechanism, self._sasl = self._sasl, None
        self.state = "COMMAND"
        return mechanism

    # -- the outcome of a login -------------------------------------------------------

    def _auth_failed(self, failure, mechanism, identity, fingerprint=None):
        if self.logins.failed(failure, mechanism, identity, fingerprint) == UNAVAILABLE:
            self.failResponse("[SYS/TEMP] Authentication is unavailable, try again later")
            return None
        text = ("[AUTH] Malformed SASL response" if failure.check(Malformed)
                else "[AUTH] Authentication failed")
        if self.logins.banned:
            self.failResponse(text)             # the failure first, then the ban's words
            self.defence_close()
            return None
        if self.logins.failures >= MAX_AUTH_FAILURES:
            # Stock POP3 lets a client guess forever on one connection (T21).
            self.emit("pop3.limit", kind="auth_failures")
            self._close_with(text + ", too many failures, closing")
        else:
            self.failResponse(text)
        return None

    def _authenticated(self, account, mechanism):
        self.logins.succeeded(mechanism, account.address)
        folder = self.factory.store.user(account.address).folder("INBOX")
        if not folder.try_lock(self):
            # Stock POP3 has no maildrop lock (T21): two sessions would both
            # delete, or one would see messages the other removed.
            self.emit("pop3.limit", kind="in_use")
            self.failResponse("[IN-USE] Maildrop is locked by another session")
            return None
        d = folder.scan()
        d.addErrback(_no_inbox)
        d.addCallbacks(self._opened, self._open_failed,
                       callbackArgs=(folder, account, mechanism), errbackArgs=(folder,))
        return d

    def _opened(self, scan, folder, account, mechanism):
        if self._closing:               # the client left while the folder was read
            folder.unlock(self)
            return
        if scan is None:
            self.mbox = Maildrop(folder)
        else:
            self.mbox = Maildrop(folder, scan.messages, scan.uidvalidity)
        self.account = account
        count, octets = self.mbox.stat()
        self.emit("pop3.login", listener=self.factory.listener, account=account.address,
                  mechanism=mechanism, messages=count, octets=octets)
        self.successResponse(f"Logged in, {count} messages ({octets} octets)")

    def _open_failed(self, failure, folder):
        folder.unlock(self)
        _log.failure("cannot open a POP3 maildrop", failure)
        self.failResponse("[SYS/TEMP] Cannot open the maildrop, try again later")

    # -- TRANSACTION ---------------------------------------------------------------

    def do_STAT(self, rest):
        self._no_arguments(rest)
        count, octets = self.mbox.stat()
        self.successResponse(f"{count} {octets}")

    def _one_argument(self, rest):
        """None (no argument) or the one message number given."""
        args = rest.split(b" ") if rest else []
        if not args:
            return None
        if len(args) != 1:
            raise Refusal("One message number expected", "syntax")
        return _number(args[0])

    def do_LIST(self, rest):
        number = self._one_argument(rest)
        if number is not None:
            self.successResponse(f"{number} {self.mbox.message(number).size}")
            return
        count, octets = self.mbox.stat()
        lines = [b"%d %d" % (n, m.size) for n, m in self.mbox.live()]
        self._write_lines(f"{count} messages ({octets} octets)", lines)

    def do_UIDL(self, rest):
        number = self._one_argument(rest)
        if number is not None:
            message = self.mbox.message(number)
            self.successResponse(f"{number} {self.mbox.uidl(message)}")
            return
        lines = [b"%d %s" % (n, self.mbox.uidl(m).encode("ascii")) for n, m in self.mbox.live()]
        self._write_lines("Unique-ID listing follows", lines)

    def do_RETR(self, rest):
        number = self._one_argument(rest)
        if number is None:
            raise Refusal("RETR needs a message number", "syntax")
        message = self.mbox.message(number)
        d = self.mbox.read(message)
        d.addCallback(self._retrieved, number, message)
        d.addErrback(self._unreadable, number)
        return d

    def _retrieved(self, data, number, message):
        self.mbox.retrieved.add(number)
        self.emit("pop3.retrieve", account=self.account.address,
                  uidl=self.mbox.uidl(message), size=len(data))
        return self._send(f"{len(data)} octets", dot_stuffed(data))

    def do_TOP(self, rest):
        args = rest.split(b" ") if rest else []
        if len(args) != 2:
            raise Refusal("TOP needs a message number and a line count", "syntax")
        number, lines = _number(args[0]), _number(args[1], "line count")
        message = self.mbox.message(number)
        d = self.mbox.read(message)
        d.addCallback(lambda data: self._send("Top of message follows",
                                              dot_stuffed(top_of(data, lines))))
        d.addErrback(self._unreadable, number)
        return d

    def _unreadable(self, failure, number):
        if failure.check(MessageGone):
            self.failResponse(f"Message {number} is no longer available")
            return None
        _log.failure("cannot read a message for POP3", failure)
        self.failResponse("[SYS/TEMP] Cannot read the message, try again later")
        return None

    def _send(self, first, body):
        """``+OK first`` then the stuffed body through a producer; fires when sent."""
        if self._closing:
            return None
        self.successResponse(first)
        self._sender = _Sender(self.resetTimeout)
        self.setTimeout(self.idle_timeout)   # a reader that stops reading is dropped
        d = self._sender.beginFileTransfer(BytesIO(body), self.transport)
        d.addBoth(self._sent)
        return d

    def _sent(self, result):
        self._sender = None
        if isinstance(result, Failure) and not self._closing:
            self._lose()
        return None

    def do_DELE(self, rest):
        number = self._one_argument(rest)
        if number is None:
            raise Refusal("DELE needs a message number", "syntax")
        self.mbox.delete(number)
        self.successResponse(f"Message {number} deleted")

    def do_RSET(self, rest):
        self._no_arguments(rest)
        self.mbox.undelete()
        count, octets = self.mbox.stat()
        self.successResponse(f"{count} messages ({octets} octets)")

    def do_NOOP(self, rest):
        self._no_arguments(rest)
        self.successResponse()

    def do_QUIT(self, rest):
        """AUTHORIZATION: just close. TRANSACTION: the UPDATE state, the only
        place where messages are removed."""
        self._no_arguments(rest)
        if self.mbox is None:
            self._say_goodbye("Bye")
            return None
        d = self.mbox.commit()
        d.addCallbacks(self._committed, self._commit_failed)
        return d

    def _committed(self, removed):
        self.deleted = removed
        self._unlock()                  # the UPDATE state is over: the next session may start
        self._say_goodbye(f"Bye, {removed} messages deleted")

    def _commit_failed(self, failure):
        _log.failure("POP3 QUIT could not remove messages", failure)
        self._unlock()
        self._close_with("[SYS/TEMP] Some deleted messages not removed")

    def _say_goodbye(self, text):
        self.successResponse(text)
        self._lose()


def _no_inbox(failure):
    """An INBOX that was never made (no mail yet) is an empty maildrop."""
    failure.trap(FolderMissing)
    return None


def _reason(failure):
    return header_safe(str(failure.value))[:200] or type(failure.value).__name__


class POP3Factory(GatedFactory):
    """Builds POP3 sessions for one listener ("pop3" or "pop3s").

    ``store`` is the shared ``appliance.access.folders.MaildirStore`` (the
    maildrop lock lives on its folders, so it holds across listeners and
    against IMAP's folder objects); ``mechanisms`` an
    ``appliance.auth.sasl.Mechanisms``; ``clock`` the reactor or a
    ``task.Clock``; ``tls`` a ``ServerTLS`` enabling STLS, or, with
    ``implicit_tls``, the context the listener wraps every connection in.
    """

    protocol = POP3Session
    noisy = False

    def __init__(self, config, store, mechanisms, clock, listener="pop3", tls=None,
                 implicit_tls=False, gate=None):
        super().__init__(config, clock, listener, tls, implicit_tls, gate)
        self.store = store
        self.mechanisms = mechanisms

    def refusal(self, session, verdict):
        """The text to close a refused connection with."""
        if verdict == DENIED:
            session.emit("pop3.limit", kind="denied")
            return "Access denied"
        session.emit("pop3.limit", kind=LIMIT_KIND.get(verdict, verdict))
        return "[SYS/TEMP] " + REFUSED_TEXT[verdict]
