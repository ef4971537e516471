"""IMAP4rev1 (RFC 3501) over the Maildirs, on twisted.mail's IMAP4Server.

The protocol class is ``IMAP4Server``'s (line framing, timeouts, the
unauth/auth/select/logout states, the IAccount / IMailbox interfaces); what it
gets wrong is replaced here (TWISTED-TRAPS T3, T4, T19, T20 and the mailbox
name and MessageSet items):

- A command is assembled whole before it runs: literals are announced with
  ``{n}``, checked against a cap *before* the ``+`` (APPENDLIMIT =
  ``[server] max_message_size`` for APPEND, 64 KiB for anything else; ``{-1}``
  is a syntax error), then tokenized once with a nesting cap
  (``appliance.access.imap.syntax``).
- Commands run one at a time, in order: while one waits for the disk, the
  connection stops reading. Replies never interleave.
- STARTTLS discards whatever was pipelined behind it (T3, session fixation);
  LOGIN and AUTHENTICATE are refused before TLS (LOGINDISABLED, T4).
- Errors never carry exception texts (T20); a backend outage at login is
  ``NO [UNAVAILABLE]``, a storage error ``NO [UNAVAILABLE]``, a bug
  ``NO [SERVERBUG]``.
- Mailbox names are checked by ``appliance.access.folders.check_folder_name``
  (no ``/``, ``..``, NUL...), and sequence sets are resolved against the
  mailbox (bisection), never iterated.

Sessions share ``Folder`` objects (``MaildirStore``); each selected mailbox
is a ``MailboxView`` with its own sequence numbers, told of changes by the
folder's listeners and by deliveries (the ``delivery.local`` event), and
polling the disk (two ``stat`` calls) every few seconds only while IDLE.
"""

import re
import tempfile

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ITLSTransport
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance import events
from appliance.access.imap.mailbox import (NEEDS_ALL, NEEDS_NOTHING, MaildirAccount, fetch_needs,
                                          render_batch, search_batch, sets_seen)
from appliance.access.imap.mime import astring_out
from appliance.access.imap.search import HEADER, Query, UnknownCharset
from appliance.access.imap.syntax import (Atom, BigLiteral, String, SyntaxError_, is_string,
                                         parse_date_time, parse_fetch_items, parse_set,
                                         resolve_seqs, resolve_uids, tokenize)
from appliance.access.folders import DELIMITER, SYSTEM_FLAGS, FolderError, FolderExists, FolderMissing, FolderNameError, MessageGone, check_folder_name
from appliance.maildir import maildir_path
from appliance.auth.outcome import UNAVAILABLE, LoginRecorder
from appliance.auth.sasl import Aborted, Challenge, Malformed, encode_challenge, respond
from appliance.envelope import new_session_id
from appliance.auth.sasl import fingerprint
from appliance.defence.stages import BANNED_TEXT, LIMIT_KIND, REFUSED_TEXT
from appliance.net.gate import DENIED, GatedFactory
from appliance.net.peer import peer_ip
from appliance.message import header_safe
from appliance.net.tls import TLSError, connection_info
from appliance.watchdog import timed
from appliance.clock import cancel

_log = Logger()

for _name, _description, _fields in (
    ("imap.connect", "an IMAP client connected", ("session", "peer_ip", "listener")),
    ("imap.denied", "an IMAP connection from a [limits] deny network was refused",
     ("session", "peer_ip", "listener")),
    ("imap.login", "an IMAP client logged in", ("session", "peer_ip", "listener", "mechanism",
                                               "account")),
    ("imap.starttls", "TLS started on an IMAP connection (STARTTLS or implicit)",
     ("session", "peer_ip", "listener", "version", "cipher", "implicit")),
    ("imap.starttls.discarded", "input pipelined after IMAP STARTTLS was thrown away",
     ("session", "peer_ip", "octets")),
    ("imap.limit", "an IMAP limit was hit (line length, literal size, timeout, failures...)",
     ("session", "peer_ip", "kind")),
    ("imap.disconnect", "an IMAP connection ended",
     ("session", "peer_ip", "duration", "account")),
):
    events.register(_name, _description, _fields)

SMALL_LITERAL = 65536           # octets: a literal in anything but APPEND
NONSYNC_LITERAL = 4096          # LITERAL- (RFC 7888): {n+} up to this size
# SEARCH keys x messages, or FETCH items x messages, done on the reactor; more
# is done on a thread (issue 17: 20,000 keys x 2,000 messages took seconds).
INLINE_WORK = 20000
INLINE_KEYS = 200               # SEARCH tokens compiled on the reactor; more on a thread
BATCH_RENDERS = 200000          # FETCH items x messages in one batch of flags-only answers
MAX_COMMAND = 262144            # octets of one command, its small literals included
MAX_LINE = 16384                # octets of one line (Twisted's limit, kept)
MAX_AUTH_FAILURES = 3           # per connection; the auditor bans across connections
PREAUTH_TIMEOUT = 60.0          # seconds before login ([limits] imap_idle_timeout after)
IDLE_POLL = 5.0                 # seconds between two stat() checks while IDLE
FETCH_BATCH = 200               # messages rendered per thread hop (bodies)
HEADER_BATCH = 1000             # messages per thread hop when only headers are read
FETCH_AHEAD = 2                 # batches rendering at once when the disk is read
CACHE_SAVE_DELAY = 5.0          # seconds from a FETCH/SEARCH to writing the message cache
INLINE_LOOKUPS = 5000           # messages a command looks up on the reactor; more on a thread
FETCH_BATCH_OCTETS = 4 * 1024 * 1024

# RFC 3501 tag: ASTRING-CHARs but "+"; not "%" or "*" (list-wildcards): a "*" tag
# made "* OK completed" look like an untagged response (found by tests/fuzz).
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c\x7e]{1,64}\Z")
_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}\Z")
_KEYWORD = re.compile(rb"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,64}\Z")
_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}\Z")

NO, BAD, OK = b"NO", b"BAD", b"OK"


class ImapError(Exception):
    """A tagged NO or BAD with a fixed, client-safe text and maybe a response code."""

    def __init__(self, status, text, code=None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def no(text, code=None):
    return ImapError(NO, text, code)


def bad(text):
    return ImapError(BAD, text)


@implementer(IPushProducer)
class _Throttle:
    """Registered with the transport during a big FETCH: pauses rendering
    while the client is slow to read (nothing piles up in memory)."""

    def __init__(self):
        self.paused = False
        self._waiting = None

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self):
        self.resumeProducing()

    def wait(self):
        if not self.paused:
            return defer.succeed(None)
        self._waiting = defer.Deferred()
        return self._waiting


class _Literal:
    """A literal being read: small ones in memory, APPEND's to a temp file."""

    def __init__(self, size, big):
        self.remaining = size
        self.big = big
        self.sink = tempfile.SpooledTemporaryFile(max_size=1024 * 1024) if big else bytearray()

    def write(self, data):
        """Take what belongs to the literal; returns the rest, or None if more is due."""
        taken, rest = data[:self.remaining], data[self.remaining:]
        self.remaining -= len(taken)
        if self.big:
            self.sink.write(taken)
        else:
            self.sink += taken
        return rest if self.remaining == 0 else None

    def token(self):
        if self.big:
            self.sink.seek(0)
            return BigLiteral(self.sink)
        return String(bytes(self.sink))


# -- the protocol ---------------------------------------------------------------------------

ANSWERED = object()     # a handler that sent its own tagged reply returns this


@implementer(IHandshakeListener)
class IMAPServer(imap4.IMAP4Server):
    """One IMAP session (``IMAPFactory`` builds it)."""

    MAX_LENGTH = MAX_LINE

    # command -> states it is valid in
    COMMANDS = {
        b"CAPABILITY": "any", b"NOOP": "any", b"LOGOUT": "any", b"ID": "any",
        b"STARTTLS": "unauth", b"LOGIN": "unauth", b"AUTHENTICATE": "unauth",
        b"SELECT": "auth", b"EXAMINE": "auth", b"CREATE": "auth", b"DELETE": "auth",
        b"RENAME": "auth", b"SUBSCRIBE": "auth", b"UNSUBSCRIBE": "auth", b"LIST": "auth",
        b"LSUB": "auth", b"STATUS": "auth", b"APPEND": "auth", b"NAMESPACE": "auth",
        b"IDLE": "auth",
        b"CHECK": "select", b"CLOSE": "select", b"UNSELECT": "select", b"EXPUNGE": "select",
        b"SEARCH": "select", b"FETCH": "select", b"STORE": "select", b"COPY": "select",
        b"MOVE": "select", b"UID": "select",
    }
    UID_COMMANDS = (b"FETCH", b"SEARCH", b"STORE", b"COPY", b"MOVE", b"EXPUNGE")
    # RFC 3501 §7.4.1: no EXPUNGE responses while answering these.
    NO_EXPUNGE = (b"FETCH", b"STORE", b"SEARCH")

    def __init__(self, factory):
        super().__init__(contextFactory=factory.tls)
        self.factory = factory
        self.clock = factory.clock
        self.callLater = factory.clock.callLater        # TimeoutMixin's timer source
        self.timeOut = PREAUTH_TIMEOUT
        self.POSTAUTH_TIMEOUT = factory.config.limits.imap_idle_timeout
        self.session_id = new_session_id()
        self.peer_ip = ""
        self.tls = factory.implicit_tls
        self.user = None                # UserMaildir after login
        self.login_address = ""
        self.view = None                # MailboxView while selected
        self._segments = []
        self._segments_size = 0
        self._literal = None
        self._big_literal_used = 0         # octets of APPEND literals in this command
        self._bye_after = None
        self._running = None            # tag of the command in progress
        self._running_name = b""
        self._continuation = None       # where the next line goes (SASL, IDLE)
        self.logins = LoginRecorder(self)
        self._closing = False
        self._idle = None
        self._started = 0.0

    # -- connection life -----------------------------------------------------------

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.peer_ip = peer_ip(peer)
        self._started = self.clock.seconds()
        self.emit("imap.connect", listener=self.factory.listener)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._bye(refusal)
            return
        self.setTimeout(self.timeOut)
        caps = b" ".join(self.capability_list())
        self.sendLine(b"* OK [CAPABILITY " + caps + b"] " +
                      self.factory.hostname.encode("ascii", "replace") + b" IMAP4rev1 ready")

    def connectionLost(self, reason=protocol.connectionDone):
        self._closing = True
        self.setTimeout(None)
        self._stop_idle()
        if self.view is not None:
            self.view.close()
            self.view = None
        if self._literal is not None and self._literal.big:
            self._literal.sink.close()
        self._literal = None
        self.factory.release(self)
        self.emit("imap.disconnect", duration=round(self.clock.seconds() - self._started, 3),
                  account=self.login_address)

    def emit(self, name, **fields):
        events.emit(name, session=self.session_id, peer_ip=self.peer_ip, **fields)

    def timeoutConnection(self):
        self.emit("imap.limit", kind="timeout")
        self._bye(b"Autologout; idle for too long")

    def defence_close(self):
        """A ban of this client's network ends the session (SPEC §4)."""
        self.emit("imap.limit", kind="banned")
        self._bye(BANNED_TEXT.encode("ascii"))

    def _bye(self, text):
        if self._closing:
            return
        self._closing = True
        self.sendLine(b"* BYE " + text)
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.emit("imap.limit", kind="line_length")
        self._bye(b"[LIMIT] Line too long")

    def handshakeCompleted(self):
        version, cipher = connection_info(self.transport)
        self.emit("imap.starttls", listener=self.factory.listener, version=version,
                  cipher=cipher, implicit=self.factory.implicit_tls)

    # -- capabilities ----------------------------------------------------------------

    def capability_list(self):
        caps = [b"IMAP4rev1", b"LITERAL-", b"ID", b"IDLE", b"NAMESPACE", b"UIDPLUS", b"MOVE",
                b"UNSELECT", b"CHILDREN", b"SPECIAL-USE",
                b"APPENDLIMIT=%d" % self.factory.config.server.max_message_size]
        if self.state == "unauth":
            if not self.tls:
                if self.factory.tls is not None and ITLSTransport.providedBy(self.transport):
                    caps.append(b"STARTTLS")
                caps.append(b"LOGINDISABLED")
            else:
                caps.append(b"SASL-IR")
                caps.extend(b"AUTH=" + name.encode("ascii")
                            for name in self.factory.mechanisms.names())
        return caps

    def listCapabilities(self):
        return self.capability_list()

    # -- reading commands --------------------------------------------------------

    @timed
    def dataReceived(self, data):
        return super().dataReceived(data)

    def _client_spoke(self):
        """After login, each line (or literal chunk) restarts the idle timer.
        Before it, nothing does: PREAUTH_TIMEOUT is a deadline for the whole
        pre-login phase (a client trickling bytes or NOOPs is not held)."""
        if self.state != "unauth":
            self.resetTimeout()

    def lineReceived(self, line):
        self._client_spoke()
        if self._closing:
            return
        if self._continuation is not None:
            handler, self._continuation = self._continuation, None
            handler(line)
            self._update_flow()
            return
        self._segments.append(line)
        self._segments_size += len(line)
        if self._segments_size > MAX_COMMAND:
            self.emit("imap.limit", kind="command_size")
            self._bye(b"[LIMIT] Command too long")
            return
        marker = _LITERAL.search(line)
        if marker is not None:
            self._segments[-1] = line[:marker.start()]
            self._begin_literal(int(marker.group(1)), bool(marker.group(2)))
            return
        segments, self._segments = self._segments, []
        self._segments_size = 0
        self._big_literal_used = 0
        self._execute(segments)
        self._update_flow()

    def _begin_literal(self, size, nonsync):
        """T19: decide on a literal before anything of it is read or invited."""
        first = self._segments[0].split(b" ", 2)
        tag = first[0] if first and _TAG.match(first[0]) else None
        verb = first[1].upper() if len(first) > 1 else b""
        is_append = verb == b"APPEND" and self.state in ("auth", "select")
        # APPEND's message may be up to APPENDLIMIT; all its literals together too.
        limit = SMALL_LITERAL
        if is_append:
            limit = self.factory.config.server.max_message_size + SMALL_LITERAL \
                - self._big_literal_used
            limit = min(limit, self.factory.config.server.max_message_size)
        problem = None
        if tag is None or verb not in self.COMMANDS:
            problem = bad(b"Unknown command")
        elif not self._allowed(verb):
            problem = bad(b"Command not valid in this state")
        elif verb in (b"LOGIN", b"AUTHENTICATE") and not self.tls:
            # No password in the clear, not even invited: refused before the +.
            problem = no(b"Log in over TLS (STARTTLS) first", b"PRIVACYREQUIRED")
        elif size > limit:
            self.emit("imap.limit", kind="literal_size")
            problem = no(b"Literal too big", b"TOOBIG") if is_append else bad(b"Literal too big")
        elif nonsync and size > NONSYNC_LITERAL:
            self.emit("imap.limit", kind="literal_size")
            problem = bad(b"[TOOBIG] Non-synchronizing literal too big")
        if problem is not None:
            self._segments, self._segments_size = [], 0
            self._big_literal_used = 0
            self._respond_error(tag, problem)
            if nonsync:         # its octets are on their way and cannot be told apart
                self._bye(b"Cannot recover from a refused literal")
            return
        if size == 0:
            self._segments.append(String(b""))
            return
        big = size > SMALL_LITERAL
        if is_append:
            self._big_literal_used += size
        self._literal = _Literal(size, big)
        if not nonsync:
            self.sendLine(b"+ Ready for literal data")
        self.setRawMode()

    def rawDataReceived(self, data):
        self._client_spoke()
        rest = self._literal.write(data)
        if rest is None:
            return
        token = self._literal.token()
        if not self._literal.big:
            self._segments_size += len(token)
        self._literal = None
        self._segments.append(token)
        self.setLineMode(rest)

    def _allowed(self, verb):
        states = self.COMMANDS.get(verb)
        if states == "any":
            return True
        if states == "unauth":
            return self.state == "unauth"
        if states == "auth":
            return self.state in ("auth", "select")
        return self.state == "select"

    def _execute(self, segments):
        first = segments[0].split(b" ", 2)
        tag = first[0]
        if not first[0] or not _TAG.match(tag):
            self.sendLine(b"* BAD Invalid tag")
            return
        if len(first) < 2 or not first[1]:
            self._respond_error(tag, bad(b"Missing command"))
            return
        verb = first[1].upper()
        rest = ([first[2]] if len(first) > 2 else []) + list(segments[1:])
        if verb not in self.COMMANDS:
            self._respond_error(tag, bad(b"Unknown command"))
            return
        if not self._allowed(verb):
            self._respond_error(tag, bad(b"Command not valid in this state"))
            return
        try:
            args = tokenize(rest)
        except SyntaxError_ as exc:
            self._respond_error(tag, bad(str(exc).encode("ascii")))
            return
        uid = False
        name = verb
        if verb == b"UID":
            if not args or not isinstance(args[0], Atom) or args[0].upper() not in self.UID_COMMANDS:
                self._respond_error(tag, bad(b"Unknown UID command"))
                return
            name, args, uid = args[0].upper(), args[1:], True
        handler = getattr(self, "cmd_" + name.decode("ascii"))
        self._running = tag
        self._running_name = name if not uid else b"UID " + name
        d = defer.maybeDeferred(handler, tag, args, uid) if uid or name in self.UID_COMMANDS \
            else defer.maybeDeferred(handler, tag, args)
        d.addCallbacks(self._completed, self._failed, callbackArgs=(tag,), errbackArgs=(tag,))

    def _update_flow(self):
        """Read the next command only when the current one is answered
        (replies stay in order; pipelined lines wait in the buffer)."""
        waiting = (self._running is not None and self._continuation is None
                   and self._literal is None)
        if self._closing or self.transport is None:
            return
        if waiting and not self.paused:
            self.pauseProducing()
        elif not waiting and self.paused:
            self.resumeProducing()

    # -- answering ---------------------------------------------------------------

    def _completed(self, result, tag):
        """Handlers fire with (text, code) or None; untagged updates go first."""
        if result is ANSWERED:
            return
        text, code = result if result is not None else (b"completed", None)
        self._finish(tag, OK, text, code)

    def _failed(self, failure, tag):
        self._finish(tag, *describe_failure(failure, self))

    def _finish(self, tag, status, text, code=None):
        if self._closing:
            self._running = None
            return
        if self.view is not None:
            allow = self._running_name not in self.NO_EXPUNGE
            for line in self.view.pending(allow_expunge=allow):
                self.sendLine(line)
        self._send_tagged(tag, status, text, code)
        self._running = None
        if self._bye_after is not None:
            self._bye(self._bye_after)
            return
        self._update_flow()

    def _send_tagged(self, tag, status, text, code=None):
        line = tag + b" " + status + b" "
        if code:
            line += b"[" + code + b"] "
        self.sendLine(line + text)

    def _respond_error(self, tag, problem):
        self._send_tagged(tag or b"*", problem.status, problem.text, problem.code)

    def untagged(self, line):
        self.sendLine(b"* " + line)

    # -- any state ---------------------------------------------------------------

    def cmd_CAPABILITY(self, tag, args):
        _no_args(args)
        self.untagged(b"CAPABILITY " + b" ".join(self.capability_list()))
        return None

    def cmd_NOOP(self, tag, args):
        _no_args(args)
        return self._refresh()

    def _refresh(self):
        if self.view is None:
            return None
        d = self.view.refresh()
        d.addCallback(lambda _: None)
        return d

    def cmd_LOGOUT(self, tag, args):
        _no_args(args)
        self.untagged(b"BYE Logging out")
        self._send_tagged(tag, OK, b"LOGOUT completed")
        self._running = None
        self._closing = True
        self.transport.loseConnection()
        return ANSWERED

    def cmd_ID(self, tag, args):
        if len(args) != 1 or not (isinstance(args[0], list) or args[0].upper() == b"NIL"):
            raise bad(b"ID takes a list or NIL")
        self.untagged(b'ID ("name" "mailappliance")')
        return None

    # -- not authenticated ---------------------------------------------------------

    def cmd_STARTTLS(self, tag, args):
        _no_args(args)
        if self.tls:
            raise bad(b"TLS is active already")
        tls = self.factory.tls
        if tls is None or not ITLSTransport.providedBy(self.transport):
            raise no(b"TLS not available")
        try:
            tls.context
        except TLSError:
            _log.failure("no TLS context for IMAP STARTTLS")
            raise no(b"TLS not available") from None
        self._discard_pipelined()
        self._send_tagged(tag, OK, b"Begin TLS negotiation now")
        self._running = None
        self.transport.startTLS(tls)
        self.tls = True
        return ANSWERED

    def _discard_pipelined(self):
        """T3: lines sent in the clear behind STARTTLS must never run under TLS
        (stock Twisted runs them: an attacker's LOGIN fixes the session)."""
        octets = len(self.clearLineBuffer()) + sum(len(s) for s in self._segments
                                                  if isinstance(s, bytes))
        self._segments, self._segments_size = [], 0
        if octets:
            self.emit("imap.starttls.discarded", octets=octets)

    def cmd_LOGIN(self, tag, args):
        if len(args) != 2 or not all(is_string(a) for a in args):
            raise bad(b"LOGIN needs a user name and a password")
        if not self.tls:
            raise no(b"Log in over TLS (STARTTLS) first", b"PRIVACYREQUIRED")
        user, password = (_utf8(a) for a in args)
        d = self.factory.accounts.authenticate(user, password)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=("LOGIN",),
                       errbackArgs=("LOGIN", user, fingerprint(user, password)))
        return d

    def cmd_AUTHENTICATE(self, tag, args):
        if not args or len(args) > 2 or not isinstance(args[0], Atom) \
                or not _MECHANISM.match(args[0]):
            raise bad(b"AUTHENTICATE needs a mechanism name")
        if not self.tls:            # T4: stock accepts PLAIN in the clear
            raise no(b"Authenticate over TLS (STARTTLS) first", b"PRIVACYREQUIRED")
        mechanism = self.factory.mechanisms.create(args[0].decode("ascii"))
        if mechanism is None:
            raise no(b"Unsupported authentication mechanism", b"CANNOT")
        done = defer.Deferred()
        if len(args) == 2 and not is_string(args[1]):      # SASL-IR (RFC 4959)
            raise bad(b"Bad initial response")
        self._sasl_step(bytes(args[1]) if len(args) == 2 else None, mechanism, done)
        return done

    def _sasl_step(self, line, mechanism, done):
        respond(mechanism, line).addCallbacks(
            self._sasl_next, self._sasl_failed,
            callbackArgs=(mechanism, done), errbackArgs=(mechanism, done))

    def _sasl_next(self, result, mechanism, done):
        if isinstance(result, Challenge):
            self.sendLine(b"+ " + encode_challenge(result.data))
            self._continuation = lambda line: self._sasl_step(line, mechanism, done)
            self._update_flow()
            return
        d = self._logged_in(result, mechanism.name)
        d.chainDeferred(done)

    def _sasl_failed(self, failure, mechanism, done):
        if failure.check(Aborted):
            done.errback(Failure(bad(b"AUTHENTICATE cancelled")))
            return
        if failure.check(Malformed):
            self.logins.failed(failure, mechanism.name, mechanism.identity)
            self._after_refusal()
            done.errback(Failure(bad(b"Malformed authentication exchange")))
            return
        self._login_failed(failure, mechanism.name, mechanism.identity,
                           mechanism.fingerprint).addErrback(done.errback)

    @defer.inlineCallbacks
    def _logged_in(self, account, mechanism):
        """Open the user's Maildir (INBOX and the special folders) and enter
        the authenticated state."""
        user = self.factory.store.user(account.address)
        try:
            yield user.ensure()
        except Exception:
            _log.failure("cannot open the Maildir of {address}", address=account.address)
            raise no(b"Mailbox not available, try later", b"UNAVAILABLE")
        self.user = user
        self.account = MaildirAccount(user)
        self.login_address = account.address
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self.logins.succeeded(mechanism, account.address)
        self.emit("imap.login", listener=self.factory.listener, mechanism=mechanism,
                  account=account.address)
        return (b"Logged in", b"CAPABILITY " + b" ".join(self.capability_list()))

    def _login_failed(self, failure, mechanism, identity, fingerprint=None):
        if failure.check(ImapError):
            return defer.fail(failure)
        if self.logins.failed(failure, mechanism, identity, fingerprint) == UNAVAILABLE:
            return defer.fail(no(b"Authentication is not available now, try later",
                                 b"UNAVAILABLE"))
        self._after_refusal()
        return defer.fail(no(b"Authentication failed", b"AUTHENTICATIONFAILED"))

    def _after_refusal(self):
        if self.logins.banned:
            # The ban was placed before this answer (LoginRecorder): the
            # client's other sessions are closed already, this one after its NO.
            self.emit("imap.limit", kind="banned")
            self._bye_after = BANNED_TEXT.encode("ascii")
            return
        if self.logins.failures >= MAX_AUTH_FAILURES:
            self.emit("imap.limit", kind="auth_failures")
            self._bye_after = b"Too many authentication failures"   # after the tagged NO

    # -- authenticated: folders --------------------------------------------------

    def cmd_SELECT(self, tag, args):
        return self._select(args, True)

    def cmd_EXAMINE(self, tag, args):
        return self._select(args, False)

    @defer.inlineCallbacks
    def _select(self, args, readwrite):
        name = _one_mailbox(args)
        self._unselect()
        view = yield self.account.select(name, readwrite)
        flags = b" ".join(f.encode("ascii") for f in view.getFlags())
        permanent = flags + (b" \\*" if view.folder.can_add_keywords else b"")
        self.untagged(b"FLAGS (" + flags + b")")
        self.untagged(b"OK [PERMANENTFLAGS (" + (permanent if readwrite else b"") + b")] Limited")
        self.untagged(b"%d EXISTS" % view.getMessageCount())
        self.untagged(b"%d RECENT" % view.getRecentCount())
        unseen = view.first_unseen()
        if unseen is not None:
            self.untagged(b"OK [UNSEEN %d] First unseen" % unseen)
        self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % view.getUIDValidity())
        self.untagged(b"OK [UIDNEXT %d] Predicted next UID" % view.getUIDNext())
        view.addListener(self)
        self.view = view
        self.mbox = view
        self.state = "select"
        return (b"SELECT completed" if readwrite else b"EXAMINE completed",
                b"READ-WRITE" if readwrite else b"READ-ONLY")

    def _unselect(self):
        if self.view is not None:
            self.view.close()
        self.view = self.mbox = None
        if self.state == "select":
            self.state = "auth"

    def cmd_CREATE(self, tag, args):
        name = _one_mailbox(args)
        if check_folder_name(name.rstrip(DELIMITER) or name) == "INBOX":
            raise no(b"INBOX exists", b"ALREADYEXISTS")
        return self.account.create(name)

    def cmd_DELETE(self, tag, args):
        name = _one_mailbox(args)
        if self.view is not None and self.view.folder.name == check_folder_name(name):
            self._unselect()
        return self.account.delete(name)

    def cmd_RENAME(self, tag, args):
        if len(args) != 2:
            raise bad(b"RENAME needs two mailbox names")
        old, new = _mailbox(args[0]), _mailbox(args[1])
        return self.account.rename(old, new)

    def cmd_SUBSCRIBE(self, tag, args):
        return self.account.subscribe(_one_mailbox(args))

    def cmd_UNSUBSCRIBE(self, tag, args):
        return self.account.unsubscribe(_one_mailbox(args))

    def cmd_LIST(self, tag, args):
        return self._list(args, b"LIST")

    def cmd_LSUB(self, tag, args):
        return self._list(args, b"LSUB")

    @defer.inlineCallbacks
    def _list(self, args, verb):
        if len(args) != 2 or not all(is_string(a) for a in args):
            raise bad(verb + b" needs a reference and a pattern")
        ref, pattern = _decode_name(args[0]), _decode_name(args[1])
        if pattern == "":
            self.untagged(verb + b' (\\Noselect) "." ""')
            return None
        found = yield self.account.listMailboxes(ref, pattern)
        subscribed = (yield self.user.subscriptions()) if verb == b"LSUB" else None
        for name, attributes in found:
            if subscribed is not None and name not in subscribed:
                continue
            self.untagged(verb + b" (" + " ".join(attributes).encode("ascii") + b') "." ' +
                          astring_out(name.encode("imap4-utf-7")))
        return None

    @defer.inlineCallbacks
    def cmd_STATUS(self, tag, args):
        if len(args) != 2 or not is_string(args[0]) or not isinstance(args[1], list):
            raise bad(b"STATUS needs a mailbox and a list of items")
        name = _mailbox(args[0])
        items = [bytes(a).upper() for a in args[1] if isinstance(a, Atom)]
        known = (b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN")
        if len(items) != len(args[1]) or not items or any(i not in known for i in items):
            raise bad(b"Unknown STATUS item")
        folder = self.user.folder(name)
        result = yield folder.scan()
        values = {b"MESSAGES": len(result.messages), b"UIDNEXT": result.uidnext,
                  b"UIDVALIDITY": result.uidvalidity, b"RECENT": folder.unclaimed_recent(),
                  b"UNSEEN": sum(1 for m in result.messages if "S" not in m.info)}
        if self.view is not None and self.view.folder is folder:
            values[b"RECENT"] += len(self.view.recent)
        pairs = b" ".join(b"%s %d" % (item, values[item]) for item in items)
        self.untagged(b"STATUS " + astring_out(name.encode("imap4-utf-7")) + b" (" + pairs + b")")
        return None

    @defer.inlineCallbacks
    def cmd_APPEND(self, tag, args):
        if len(args) < 2 or not is_string(args[0]):
            raise bad(b"APPEND needs a mailbox and a message")
        name = _mailbox(args[0])
        rest = list(args[1:])
        flags, date = [], None
        if rest and isinstance(rest[0], list):
            flags = _flag_list(rest.pop(0))
        if len(rest) == 2 and isinstance(rest[0], String):
            date = parse_date_time(rest.pop(0))
        if len(rest) != 1 or not isinstance(rest[0], (BigLiteral, String)):
            raise bad(b"APPEND needs the message as a literal")
        data = rest[0].data if isinstance(rest[0], BigLiteral) else bytes(rest[0])
        try:
            if _literal_size(data) == 0:
                raise no(b"Empty message")
            folder = self.user.folder(name)
            try:
                message = yield folder.append(data, [f for f in flags if f != "\\Recent"], date)
            except FolderMissing:
                raise no(b"No such mailbox", b"TRYCREATE") from None
        finally:
            if hasattr(data, "close"):
                data.close()
        return (b"APPEND completed",
                b"APPENDUID %d %d" % (folder.uidvalidity, message.uid))

    def cmd_NAMESPACE(self, tag, args):
        _no_args(args)
        self.untagged(b'NAMESPACE (("" ".")) NIL NIL')
        return None

    # -- IDLE (RFC 2177) -----------------------------------------------------------

    def cmd_IDLE(self, tag, args):
        _no_args(args)
        done = defer.Deferred()
        self._idle = _Idle(self, done)
        self.sendLine(b"+ idling")
        self._flush_updates()
        self._continuation = self._idle_line
        self._update_flow()
        self._idle.schedule()
        return done

    def _idle_line(self, line):
        idle, self._idle = self._idle, None
        if idle is None:
            return
        idle.stop()
        if line.upper() == b"DONE":
            idle.done.callback((b"IDLE terminated", None))
        else:
            idle.done.errback(Failure(bad(b"Expected DONE")))

    def _stop_idle(self):
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.stop()

    def newMessages(self, exists, recent):
        """Our folder changed (another session, a delivery, a poll): while
        IDLE the client hears of it at once, else before the next reply."""
        if self._idle is not None:
            self._flush_updates()

    def _flush_updates(self):
        if self.view is not None and not self._closing:
            for line in self.view.pending(allow_expunge=True):
                self.sendLine(line)

    # -- selected ----------------------------------------------------------------

    def cmd_CHECK(self, tag, args):
        _no_args(args)
        return self._refresh()

    def cmd_CLOSE(self, tag, args):
        _no_args(args)
        view = self.view
        if not view.readwrite:
            self._unselect()
            return None
        d = view.expunge()
        d.addCallback(lambda _: self._unselect())
        return d

    def cmd_UNSELECT(self, tag, args):
        _no_args(args)
        self._unselect()
        return None

    def cmd_EXPUNGE(self, tag, args, uid=False):
        view = self._writable()
        if uid:
            if len(args) != 1:
                raise bad(b"UID EXPUNGE needs a UID set")
            chosen = set(self._resolve(args[0], True))
        else:
            _no_args(args)
            chosen = None
        d = self._targets(range(1, len(view.uids) + 1))
        d.addCallback(lambda live: view.folder.expunge(
            [m.uid for seq, m in live if "T" in m.info and (chosen is None or seq in chosen)]))
        d.addCallback(lambda _: self.factory.save_cache_later(view.folder))
        return d

    def _writable(self):
        if not self.view.readwrite:
            raise no(b"Mailbox is read-only", b"READ-ONLY")
        return self.view

    def _resolve(self, token, uid):
        """Sequence numbers of a set (T: clamped to the mailbox, never iterated)."""
        ranges = parse_set(token)
        view = self.view
        if uid:
            return [i + 1 for i in resolve_uids(ranges, view.uids)]
        try:
            return resolve_seqs(ranges, len(view.uids))
        except ValueError:
            raise bad(b"Invalid message sequence number") from None

    def _live(self, seqs):
        """(seq, Message) for messages not expunged by someone else meanwhile."""
        return live_messages(self.view, seqs)

    def _targets(self, seqs):
        """Deferred[[(seq, Message)]] of ``seqs``: on a thread when there are
        many (100,000 lookups would hold the reactor for tens of ms)."""
        if len(seqs) <= INLINE_LOOKUPS:
            return defer.succeed(list(self._live(seqs)))
        return self.factory.run_in_thread(lambda view=self.view: list(live_messages(view, seqs)))

    @defer.inlineCallbacks
    def cmd_STORE(self, tag, args, uid=False):
        view = self._writable()
        if len(args) < 3 or not isinstance(args[1], Atom):
            raise bad(b"STORE needs a set, an item and flags")
        seqs = self._resolve(args[0], uid)
        item = bytes(args[1]).upper()
        modes = {b"FLAGS": "set", b"+FLAGS": "add", b"-FLAGS": "remove"}
        silent = item.endswith(b".SILENT")
        mode = modes.get(item[:-7] if silent else item)
        if mode is None:
            raise bad(b"Unknown STORE item")
        values = args[2] if len(args) == 3 and isinstance(args[2], list) else args[2:]
        flags = _flag_list(values)
        targets = yield self._targets(seqs)
        gone = len(targets) != len(seqs)
        yield view.folder.store([m.uid for _, m in targets], flags, mode)
        for seq, old in targets:
            message = view.folder.get(old.uid)
            if message is None:
                gone = True
                continue
            view.shown(message)
            if not silent:
                line = b"%d FETCH (FLAGS %s" % (seq, view.flag_bytes(message))
                self.untagged(line + (b" UID %d)" % message.uid if uid else b")"))
        if gone:
            raise no(b"Some messages were expunged meanwhile", b"EXPUNGEISSUED")
        return None

    def cmd_COPY(self, tag, args, uid=False):
        return self._copy(args, uid, move=False)

    def cmd_MOVE(self, tag, args, uid=False):
        self._writable()
        return self._copy(args, uid, move=True)

    @defer.inlineCallbacks
    def _copy(self, args, uid, move):
        if len(args) != 2 or not is_string(args[1]):
            raise bad(b"COPY needs a set and a mailbox")
        seqs = self._resolve(args[0], uid)
        name = _mailbox(args[1])
        dest = self.user.folder(name)
        targets = yield self._targets(seqs)
        view = self.view
        try:
            pairs = yield view.folder.copy_to([m.uid for _, m in targets], dest, move=move)
        except FolderMissing:
            raise no(b"No such mailbox", b"TRYCREATE") from None
        code = None
        if pairs:
            code = b"COPYUID %d %s %s" % (dest.uidvalidity, _uid_set([p[0] for p in pairs]),
                                          _uid_set([p[1] for p in pairs]))
        if move:
            if code:
                self.untagged(b"OK [" + code + b"] Moved")
            return (b"MOVE completed", None)
        return (b"COPY completed", code)

    @defer.inlineCallbacks
    def cmd_FETCH(self, tag, args, uid=False):
        if len(args) < 2:
            raise bad(b"FETCH needs a set and items")
        seqs = self._resolve(args[0], uid)
        items = parse_fetch_items(args[1:])
        if uid and not any(i.name == "UID" for i in items):
            items = [items_uid()] + items
        view = self.view
        if view.readwrite and any(sets_seen(i) for i in items):
            targets = yield self._targets(seqs)
            gone = len(targets) != len(seqs)
            unseen = [m.uid for _, m in targets if "S" not in m.info]
            if unseen:
                yield view.folder.store(unseen, ["\\Seen"], "add")
                if not any(i.name == "FLAGS" for i in items):
                    items = items + [items_flags()]
        else:
            # Looked up batch by batch as they are sent: no list of 100,000
            # (seq, Message) pairs for the cyclic collector to walk meanwhile.
            targets, gone = _Live(view, seqs), False
        gone = (yield self._send_fetch(targets, items)) or gone
        gone = gone or getattr(targets, "missing", 0) > 0
        self.factory.save_cache_later(view.folder)
        if gone:
            raise no(b"Some messages were expunged meanwhile", b"EXPUNGEISSUED")
        return None

    @defer.inlineCallbacks
    def _send_fetch(self, targets, items):
        """Render in batches (on a thread when the disk is needed), write each
        batch as it is ready, and wait while the client is slow to read.
        Batches that read the disk go ``FETCH_AHEAD`` at a time: one thread
        waits for the disk while another parses (memory stays bounded)."""
        view = self.view
        need = fetch_needs(items)
        throttle = _Throttle()
        self.transport.registerProducer(throttle, True)
        gone = False
        batches = _batches(targets, need, len(items))

        def start(batch):
            rows = []
            for seq, old in batch:
                message = view.folder.get(old.uid) or old
                rows.append((seq, message, view.flag_bytes(message)))
                view.shown(message)
            if need == NEEDS_NOTHING and len(rows) * len(items) <= INLINE_WORK:
                return defer.succeed(render_batch(view.folder, rows, items, need))
            return self.factory.run_in_thread(render_batch, view.folder, rows, items, need)

        ahead = []
        try:
            for batch in batches:
                ahead.append(start(batch))
                if need == NEEDS_NOTHING or len(ahead) >= FETCH_AHEAD:
                    break
            while ahead:
                data, missing = yield ahead.pop(0)
                gone = gone or bool(missing)
                if self._closing:
                    break
                self.transport.write(data)
                yield throttle.wait()
                batch = next(batches, None)
                if batch is not None:
                    ahead.append(start(batch))
        finally:
            for abandoned in ahead:         # the client left: nobody reads these
                abandoned.addErrback(lambda _: None)
            if not self._closing:
                self.transport.unregisterProducer()
        return gone

    @defer.inlineCallbacks
    def cmd_SEARCH(self, tag, args, uid=False):
        args = list(args)
        charset = None
        if args and isinstance(args[0], Atom) and args[0].upper() == b"CHARSET":
            if len(args) < 2 or not is_string(args[1]):
                raise bad(b"CHARSET needs a name")
            charset = bytes(args[1]).decode("ascii", "replace")
            args = args[2:]
        view = self.view
        try:
            if _token_count(args) > INLINE_KEYS:    # compiling is ~30 us a key: not here
                query = yield self.factory.run_in_thread(Query, args, list(view.uids), charset)
            else:
                query = Query(args, view.uids, charset)
        except UnknownCharset:
            raise no(b"Unsupported charset", b"BADCHARSET (US-ASCII UTF-8)") from None
        except SyntaxError_ as exc:
            raise bad(str(exc).encode("ascii")) from None
        recent = frozenset(view.recent)
        count = len(view.uids)
        if query.needs >= HEADER or count * max(query.cost, 1) > INLINE_WORK:
            # The rows are made on the thread too: a lookup per message is
            # too much for the reactor at 100,000 messages.
            found = yield self.factory.run_in_thread(search_view, view, query, recent, count)
        else:
            found = search_view(view, query, recent, count)
        numbers = [u if uid else seq for seq, u in found]
        self.untagged(b"SEARCH" + b"".join(b" %d" % n for n in numbers))
        self.factory.save_cache_later(view.folder)
        return None


def live_messages(view, seqs):
    """(seq, Message) of ``seqs`` in ``view``, leaving out what was expunged meanwhile."""
    for seq in seqs:
        message = view.message(seq)
        if message is not None:
            yield seq, message


def search_view(view, query, recent, count):
    """SEARCH over the first ``count`` messages of ``view``: [(seq, uid)].
    The rows are made one at a time (a list of 100,000 would be objects
    for the cyclic collector to walk)."""
    rows = ((seq, message, message.uid in recent)
            for seq, message in live_messages(view, range(1, count + 1)))
    return search_batch(view.folder, query, rows)


def _token_count(tokens):
    """Tokens in ``tokens``, those of nested lists included."""
    count, pending = 0, [tokens]
    while pending:
        for token in pending.pop():
            count += 1
            if isinstance(token, list):
                pending.append(token)
    return count


def items_uid():
    return parse_fetch_items([Atom(b"UID")])[0]


def items_flags():
    return parse_fetch_items([Atom(b"FLAGS")])[0]


def _batches(targets, need, items=1):
    """Split a FETCH (an iterable of (seq, Message)) into batches: big for
    flags only (but at most ``BATCH_RENDERS`` items rendered: the answer is
    built in memory), bounded by octets for bodies."""
    if need == NEEDS_NOTHING:
        most = max(1, min(2000, BATCH_RENDERS // items))
    else:
        most = FETCH_BATCH if need == NEEDS_ALL else HEADER_BATCH
    batch, octets = [], 0
    for target in targets:
        batch.append(target)
        if need == NEEDS_ALL:
            octets += target[1].size
        if len(batch) >= most or octets >= FETCH_BATCH_OCTETS:
            yield batch
            batch, octets = [], 0
    if batch:
        yield batch


class _Live:
    """The (seq, Message) of ``seqs``, looked up while iterating; ``missing``
    counts those expunged meanwhile."""

    def __init__(self, view, seqs):
        self.view = view
        self.seqs = seqs
        self.missing = 0

    def __iter__(self):
        for seq in self.seqs:
            message = self.view.message(seq)
            if message is None:
                self.missing += 1
            else:
                yield seq, message


class _Idle:
    """While IDLE: every ``IDLE_POLL`` seconds, two stat() calls tell whether
    the disk changed (another program's delivery); only then a scan."""

    def __init__(self, server, done):
        self.server = server
        self.done = done
        self._call = None
        self._stopped = False

    def schedule(self):
        if not self._stopped and self.server.view is not None:
            self._call = self.server.clock.callLater(self.server.factory.idle_poll, self._poll)

    def _poll(self):
        self._call = None
        folder = self.server.view.folder if self.server.view is not None else None
        if folder is None or self._stopped:
            return
        d = folder.changed_on_disk()
        d.addCallback(lambda changed: folder.scan().addCallback(folder.notify)
                      if changed else None)
        d.addErrback(lambda f: _log.failure("IDLE poll failed", f))
        d.addBoth(lambda _: self.schedule())

    def stop(self):
        self._stopped = True
        self._call = cancel(self._call)


# -- helpers ------------------------------------------------------------------------------

def describe_failure(failure, server):
    """``(status, text, code)`` for a failed command, never an exception text (T20)."""
    value = failure.value
    if isinstance(value, ImapError):
        return value.status, value.text, value.code
    if isinstance(value, SyntaxError_):
        return BAD, str(value).encode("ascii"), None
    if isinstance(value, FolderNameError):
        return NO, b"Invalid mailbox name", b"CANNOT"
    if isinstance(value, FolderMissing):
        return NO, b"Mailbox does not exist", b"NONEXISTENT"
    if isinstance(value, FolderExists):
        return NO, b"Mailbox exists", b"ALREADYEXISTS"
    if isinstance(value, MessageGone):
        return NO, b"Some messages were expunged meanwhile", b"EXPUNGEISSUED"
    if isinstance(value, FolderError):
        return NO, header_safe(str(value)).encode("ascii", "replace")[:200], b"CANNOT"
    if isinstance(value, (OSError, IOError)):
        _log.failure("IMAP storage error", failure)
        return NO, b"Mail storage is not available, try later", b"UNAVAILABLE"
    _log.failure("IMAP command failed", failure)
    return NO, b"Internal error", b"SERVERBUG"


def _reason(failure):
    return header_safe(str(failure.value))[:200] or type(failure.value).__name__




def _no_args(args):
    if args:
        raise bad(b"Unexpected arguments")


def _utf8(token):
    try:
        return bytes(token).decode("utf-8")
    except UnicodeDecodeError:
        raise bad(b"Not UTF-8") from None


def _decode_name(token):
    """A mailbox name or pattern from the wire (modified UTF-7) as text."""
    raw = bytes(token)
    if b"\x00" in raw:
        raise no(b"Invalid mailbox name", b"CANNOT")
    try:
        return raw.decode("imap4-utf-7")
    except (UnicodeError, ValueError):
        raise no(b"Invalid mailbox name", b"CANNOT") from None


def _mailbox(token):
    if not is_string(token):
        raise bad(b"Mailbox name expected")
    name = _decode_name(token)
    try:
        return check_folder_name(name.rstrip(DELIMITER) if name.endswith(DELIMITER) else name)
    except FolderNameError:
        raise no(b"Invalid mailbox name", b"CANNOT") from None


def _one_mailbox(args):
    if len(args) != 1:
        raise bad(b"One mailbox name expected")
    return _mailbox(args[0])


def _flag_list(tokens):
    flags = []
    for token in tokens:
        if not isinstance(token, Atom):
            raise bad(b"Invalid flag")
        raw = bytes(token)
        if raw.startswith(b"\\"):
            flag = raw.decode("ascii", "replace")
            known = {f.lower(): f for f in list(SYSTEM_FLAGS) + ["\\Recent"]}
            if flag.lower() not in known:
                raise bad(b"Unknown system flag")
            flags.append(known[flag.lower()])
        elif _KEYWORD.match(raw):
            flags.append(raw.decode("ascii"))
        else:
            raise bad(b"Invalid flag")
    return flags


def _literal_size(data):
    if isinstance(data, bytes):
        return len(data)
    position = data.tell()
    data.seek(0, 2)
    size = data.tell()
    data.seek(position)
    return size


def _uid_set(numbers):
    """UIDs as a compact set (``1:3,7``), in the given order's ranges."""
    out = []
    start = prev = None
    for n in numbers:
        if start is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = n
    if start is not None:
        out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(out)


# -- the factory ---------------------------------------------------------------------------

class IMAPFactory(GatedFactory):
    """Sessions for one IMAP listener (``imap`` with STARTTLS, ``imaps`` implicit).

    ``store`` is the shared MaildirStore (POP3 uses the same one), ``accounts``
    an IAccounts, ``mechanisms`` the SASL Mechanisms, ``tls`` the ServerTLS,
    ``run_in_thread`` where message rendering and searching run.
    """

    protocol = IMAPServer
    noisy = False

    def __init__(self, config, store, accounts, mechanisms, tls, clock, listener="imap",
                 implicit_tls=False, run_in_thread=None, idle_poll=IDLE_POLL, gate=None):
        super().__init__(config, clock, listener, tls, implicit_tls, gate)
        self.store = store
        self.accounts = accounts
        self.mechanisms = mechanisms
        self.run_in_thread = run_in_thread or store.run_in_thread
        self.idle_poll = idle_poll
        self.hostname = config.server.hostname
        self._rescans = {}          # folder path -> another scan wanted after this one
        self._cache_saves = {}      # folder path -> the DelayedCall that saves its cache

    def startFactory(self):
        events.add_observer(self._delivered)

    def stopFactory(self):
        events.remove_observer(self._delivered)
        for call in self._cache_saves.values():
            if call.active():
                call.cancel()       # the file is only a cache: the next session rebuilds it
        self._cache_saves.clear()

    def save_cache_later(self, folder):
        """Write ``folder``'s message cache ``CACHE_SAVE_DELAY`` seconds from
        now, if it has news then: one write for a burst of FETCHes, and not
        while the client is still reading the answer."""
        if not folder.cache.dirty or folder.path in self._cache_saves:
            return
        self._cache_saves[folder.path] = self.clock.callLater(
            CACHE_SAVE_DELAY, self._save_cache, folder)

    def _save_cache(self, folder):
        self._cache_saves.pop(folder.path, None)
        d = folder.save_cache()
        d.addErrback(lambda f: _log.failure("saving the IMAP message cache failed", f))
        return d

    def _delivered(self, event):
        """A local delivery: sessions with that INBOX open hear of it at once."""
        if event.get("event") != "delivery.local" or not event.get("mailbox"):
            return
        try:
            path = maildir_path(self.store.root, event["mailbox"])
        except ValueError:
            return
        folder = self.store.open_folder(path)
        if folder is not None and folder.name == "INBOX":
            self._rescan(folder)

    def _rescan(self, folder):
        """One scan at a time per folder: deliveries during a scan ask for
        one more afterwards (a burst of mail costs two scans, not one each)."""
        if folder.path in self._rescans:
            self._rescans[folder.path] = True
            return
        self._rescans[folder.path] = False
        d = folder.scan()
        d.addCallback(folder.notify)
        d.addErrback(lambda f: _log.failure("rescan after delivery failed", f))
        d.addBoth(lambda _: self._rescanned(folder))

    def _rescanned(self, folder):
        again = self._rescans.pop(folder.path, False)
        if again:
            self._rescan(folder)

    def refusal(self, server, verdict):
        """The BYE text to close a refused connection with."""
        if verdict == DENIED:
            server.emit("imap.denied", listener=self.listener)
            return b"Access denied"
        server.emit("imap.limit", kind=LIMIT_KIND.get(verdict, verdict))
        return b"[UNAVAILABLE] " + REFUSED_TEXT[verdict].encode("ascii")


