"""The ESMTP server: one protocol for the SMTP listeners, built on twisted.mail's ESMTP.

Three layers, kept apart:

- framing (``appliance.net.framing``): CRLF-only lines, bounded memory;
- dispatch (``appliance.net.session``, its hooks here): one command at a
  time, replies in command order, later lines held while a policy answer or
  the spool is pending;
- policy (``appliance.policy.relay``): who may send what to whom.

The class stays an ``smtp.ESMTP`` and keeps its mode names, but every command
handler and the line handling are our own: the stock ones carry the holes
listed in TWISTED-TRAPS.md (T7-T10, T16-T18, T23), each named where it is
closed. STARTTLS is here (for every listener with a TLS context: T1, T2);
AUTH (stock: T4-T6) is refused here and added by the submission profile
(``appliance.receive.submission``), which extends ``commands`` and
``ehlo_keywords``.
"""

import re

from OpenSSL import SSL
from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

from appliance import events
from appliance.address import AddressError, Path, parse_path, split_path
from appliance.envelope import Envelope, Session, new_queue_id, new_session_id
from appliance.net.write import write_now
from appliance import replies
from appliance.net.framing import DataBody, Line
from appliance.defence import stages
from appliance.defence.junk import JUNK_VERBS
from appliance.net.gate import DENIED, GatedFactory
from appliance.net.peer import peer_ip
from appliance.policy.checks import MAX_HEADER_OCTETS
from appliance.policy.dkim_body import BodyDigests
from appliance.policy.pipeline import Pipeline, Refused
from appliance.policy.relay import MXPolicy
from appliance.queue.incoming import IncomingMessage
from appliance.message import header_safe
from appliance.receive.received import protocol_name, received_header
from appliance.net.session import LineSession
from appliance.net.tls import TLSError, connection_info
from appliance.clock import cancel

COMMAND_LINE_LIMIT = 512        # octets with CRLF, RFC 5321 §4.5.3.1.4
TEXT_LINE_LIMIT = 1000          # octets with CRLF, RFC 5321 §4.5.3.1.6
DATA_END = Line(b".", 1, False, False)      # the final dot, found by LineFramer.take_body
# RCPT refusals that count towards [limits] max_errors (SPEC §4, Defences):
# a client guessing names or probing for a relay is dropped with 421.
COUNTED_REFUSALS = frozenset({replies.USER_UNKNOWN, replies.RELAY_DENIED})

_VERB = re.compile(rb"[A-Za-z]{1,16}\Z")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")
_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})

_log = Logger()

for _name, _description, _fields in (
    ("smtp.connect", "an SMTP client connected",
     ("session", "peer_ip", "peer_port", "listener")),
    ("smtp.disconnect", "an SMTP connection ended",
     ("session", "peer_ip", "duration", "messages")),
    ("smtp.helo", "EHLO or HELO accepted", ("session", "peer_ip", "helo", "esmtp")),
    ("smtp.mail", "MAIL FROM accepted", ("session", "peer_ip", "sender", "size")),
    ("smtp.rcpt.accepted", "RCPT TO accepted", ("session", "peer_ip", "recipient")),
    ("smtp.rcpt.rejected", "RCPT TO refused by policy or a limit; status is the enhanced "
     "code (5.1.1 unknown user, 5.7.1 relay denied ...)",
     ("session", "peer_ip", "recipient", "code", "reason", "status")),
    ("smtp.message.accepted", "a message is in the spool, fsynced (250 after DATA); "
     "account is the authenticated sender, empty if none",
     ("session", "peer_ip", "queue_id", "sender", "recipients", "size", "account")),
    ("smtp.message.rejected", "a message was refused after DATA, nothing stored",
     ("session", "peer_ip", "code", "reason")),
    ("smtp.protocol_error", "bad command, syntax or sequence, long line, bare CR or LF",
     ("session", "peer_ip", "kind", "detail")),
    ("smtp.timeout", "a client was dropped for being idle or slow (phase idle/command/data)",
     ("session", "peer_ip", "phase")),
    ("smtp.limit", "a connection refused or closed by a limit",
     ("session", "peer_ip", "kind")),
    ("smtp.denied", "a connection from a [limits] deny network was refused",
     ("session", "peer_ip")),
    ("smtp.starttls", "a TLS handshake finished after STARTTLS (or at connect: implicit)",
     ("session", "peer_ip", "listener", "version", "cipher", "implicit")),
    ("smtp.starttls.discarded", "input pipelined after STARTTLS was thrown away (T1)",
     ("session", "peer_ip", "octets")),
    ("smtp.tls.failed", "a TLS handshake or TLS session failed",
     ("session", "peer_ip", "listener", "error")),
):
    events.register(_name, _description, _fields)


class ProtocolError(Exception):
    """A client mistake: answered with ``reply`` and counted towards max_errors."""

    def __init__(self, reply, kind, detail):
        super().__init__(detail)
        self.reply, self.kind, self.detail = reply, kind, detail


class Transaction:
    """One MAIL ... DATA: sender, its parameters, the accepted recipients."""

    def __init__(self, sender, params):
        self.sender = sender        # a Path
        self.params = params        # kept in the envelope: BODY, SMTPUTF8
        self.recipients = []        # canonical addresses, no duplicates
        self.accepted = 0           # RCPTs answered 250, duplicates included (SPEC §4)
        self.body = None            # a DataBody once DATA is under way
        self.incoming = None        # its sink: an IncomingMessage (appliance.queue.incoming)

    @property
    def utf8(self):
        return bool(self.params.get("SMTPUTF8"))




def _verb_name(verb):
    """The upper-case command name, or "" when ``verb`` cannot be one."""
    return verb.decode("ascii").upper() if _VERB.match(verb) else ""


def _parse_params(words):
    """ESMTP ``KEY[=VALUE]`` words -> {KEY: value or None} (RFC 5321 §4.1.2)."""
    params = {}
    for word in words:
        match = _PARAM.match(word)
        if not match:
            raise ProtocolError(replies.BAD_PARAMETER, "syntax", "malformed parameter")
        key = match.group(1).upper()
        if key in params:
            raise ProtocolError(replies.BAD_PARAMETER, "syntax", f"duplicate {key}")
        params[key] = match.group(2)
    return params


@implementer(IHandshakeListener)
class ApplianceSMTP(LineSession, smtp.ESMTP):
    """One SMTP session. Built by ``SMTPFactory``; everything outside comes from it."""

    commands = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET",
                          "NOOP", "QUIT", "HELP", "VRFY"})
    # Known verbs we do not offer here: 502 rather than "unrecognized".
    unimplemented = frozenset({"EXPN", "TURN", "ETRN", "ATRN", "BDAT", "STARTTLS",
                               "AUTH", "SEND", "SOML", "SAML"})

    protocol_label = "SMTP"

    def __init__(self, factory):
        super().__init__()              # LineSession, then smtp.ESMTP
        self.factory = factory
        self.config = factory.config
        self.clock = factory.clock
        self.policy = factory.policy
        self.host = self.config.server.hostname
        self.session = None
        self.session_id = new_session_id()
        self.esmtp = False
        self.messages = 0
        self.started = 0.0
        self._txn = None
        self._errors = 0
        self._timer = None
        self._junk = None           # a JunkCounter once connected (None: no defences)
        self._body_held = False     # not reading: the DATA body waits for its file
        if factory.tls is not None and not factory.implicit_tls:
            self.commands = self.commands | {"STARTTLS"}
            self.unimplemented = self.unimplemented - {"STARTTLS"}

    # -- connection life ----------------------------------------------------

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.session = Session(peer_ip=peer_ip(peer), peer_port=getattr(peer, "port", 0),
                               listener=self.factory.listener,
                               tls=self.factory.implicit_tls)
        self.started = self.clock.seconds()
        self.emit("smtp.connect", peer_port=self.session.peer_port,
                  listener=self.session.listener)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._close_with(refusal)
            return
        self._junk = self.factory.junk_counter(self)
        self.reply(replies.greeting(self.config.server.hostname))
        self._arm_command_timer()

    def connectionLost(self, reason=protocol.connectionDone):
        if reason is not None and reason.check(SSL.Error) and self.session is not None:
            self.emit("smtp.tls.failed", listener=self.session.listener,
                      error=header_safe(str(reason.value))[:200])
        self._closing = True
        self._cancel_timer()
        if self._txn is not None and self._txn.incoming is not None:
            self._txn.incoming.discard()    # mid-DATA: no body file stays behind
        self.factory.release(self)
        self.emit("smtp.disconnect", duration=round(self.clock.seconds() - self.started, 3),
                  messages=self.messages)

    @property
    def peer_ip(self):
        return self.session.peer_ip

    def emit(self, name, **fields):
        """A structured event about this session (session id and peer IP added)."""
        events.emit(name, session=self.session_id, peer_ip=self.session.peer_ip, **fields)

    def reply(self, reply):
        if not self._closing:
            write_now(self.transport, reply.to_bytes())

    def defence_close(self):
        """A ban of this client's network ends the session (SPEC §4)."""
        self.emit("smtp.limit", kind="banned")
        self._close_with(stages.BANNED)

    def _junk_command(self):
        """Count a command that moves no mail; True when it closed the session."""
        if self._junk is not None and self._junk.count() and not self._closing:
            self.emit("smtp.limit", kind="junk_commands")
            self._close_with(stages.TOO_MANY_JUNK)
            return True
        return False

    def _close_with(self, reply):
        self.reply(reply)
        self._cancel_timer()
        self._close_transport()

    # -- input: the hooks of LineSession (appliance.net.session) --------------

    def _next_line(self):
        if self.mode != smtp.DATA:
            return self._framer.next_line(self._line_limit())
        # Whole blocks of body lines at once; line by line only where
        # take_body says so.
        done = self._framer.take_body(self._txn.body, TEXT_LINE_LIMIT)
        if done is None:
            return self._framer.next_line(TEXT_LINE_LIMIT)
        if not done and self._txn.incoming.backlogged:
            self._hold_body()
        return DATA_END if done else None

    def _hold_body(self):
        """Stop reading while the body file is behind (bounded memory: the
        framer has no complete line left, more input would only wait)."""
        if not self._body_held:
            self._body_held = True
            if not self._paused:
                self.transport.pauseProducing()

    def _body_drained(self):
        if self._body_held:
            self._body_held = False
            if not self._paused and not self._closing:
                self.transport.resumeProducing()

    def _input_held(self):
        return self._body_held

    def _line_limit(self):
        return TEXT_LINE_LIMIT if self.mode == smtp.DATA else COMMAND_LINE_LIMIT

    def _dispatch(self, line):
        if self.mode == smtp.DATA:
            return self._end_of_data() if self._txn.body.add(line) else None
        if line.too_long:
            return self._overlong_line(line)
        if line.bare:
            return self._protocol_error(replies.BARE_CR_LF_COMMAND, "bare_cr_lf", "command")
        return getattr(self, "state_" + self.mode)(line.data)

    def _arm_timeout(self):
        if self.mode != smtp.DATA:      # DATA keeps its data_timeout
            self._arm_command_timer()

    def _disarm_timeout(self):
        self._cancel_timer()

    def _input_flood(self):
        self.emit("smtp.limit", kind="pipelined_input")
        self._close_with(replies.INPUT_FLOOD)

    def _reply_internal_error(self):
        self.reply(replies.LOCAL_ERROR)

    def _unfinished_line(self):
        """A command line still without CRLF is already too long (T7).

        Answer it at once, keep discarding, and give up on a client that
        sends a very long run of bytes without a line end.
        """
        if self.mode == smtp.DATA or not self._framer.overflowing:
            return
        self._answer_overflow()

    def _line_too_long(self, octets):
        detail = (f"command line of {octets} octets" if octets is not None
                  else f"command line over {COMMAND_LINE_LIMIT} octets")
        return self._protocol_error(replies.LINE_TOO_LONG, "long_line", detail)

    def _line_flood(self):
        self.emit("smtp.limit", kind="line_flood")
        self._close_with(replies.LINE_FLOOD)

    def _protocol_error(self, reply, kind, detail):
        self.emit("smtp.protocol_error", kind=kind, detail=detail)
        self.reply(reply)
        self._count_error()

    def _count_error(self):
        """One more error towards [limits] max_errors: at the limit, 421 and close."""
        self._errors += 1
        if self._errors >= self.config.limits.max_errors and not self._closing:
            self.emit("smtp.limit", kind="max_errors")
            self._close_with(replies.TOO_MANY_ERRORS)

    def state_COMMAND(self, line):
        verb, _, rest = line.strip(b" ").partition(b" ")
        name = _verb_name(verb)
        try:
            if name in self.commands:
                if name in JUNK_VERBS and self._junk_command():
                    return None
                return getattr(self, "do_" + name)(rest.strip(b" "))
            if name in self.unimplemented:
                raise ProtocolError(replies.NOT_IMPLEMENTED, "bad_command", name)
            raise ProtocolError(replies.UNKNOWN_COMMAND, "bad_command",
                                header_safe(verb[:16].decode("latin-1")))
        except ProtocolError as error:
            return self._protocol_error(error.reply, error.kind, error.detail)

    def lookupMethod(self, command):
        """``do_<VERB>`` for the verbs in ``commands`` only: never the stock
        ``ext_STARTTLS`` / ``ext_AUTH`` (T1, T4)."""
        if isinstance(command, str):
            command = command.encode("ascii", "replace")
        name = _verb_name(command)
        return getattr(self, "do_" + name) if name in self.commands else None

    # -- timeouts (the injected clock) -----------------------------------------

    def _arm(self, seconds, phase):
        timer = self._timer
        if timer is not None and timer.args == (phase,) and timer.active():
            timer.reset(seconds)        # the same wait again: move it, no new timer
            return
        self._cancel_timer()
        self._timer = self.clock.callLater(seconds, self._timed_out, phase)

    def _arm_command_timer(self):
        """From now, one complete command line within command_timeout;
        bytes without CRLF do not count (a trickling client is dropped)."""
        self._arm(self.config.limits.command_timeout, "command")

    def _cancel_timer(self):
        self._timer = cancel(self._timer)

    def _timed_out(self, phase):
        self._timer = None
        if phase == "command" and not self._framer.buffered:
            phase = "idle"
        self.emit("smtp.timeout", phase=phase)
        self._close_with(replies.timeout(self.config.server.hostname))

    # -- commands ---------------------------------------------------------------

    def ehlo_keywords(self):
        """The EHLO extensions (T16); a profile with TLS/AUTH extends the list."""
        keywords = ["PIPELINING", f"SIZE {self.config.server.max_message_size}",
                    "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if "STARTTLS" in self.commands and not self.session.tls:
            keywords.append("STARTTLS")
        return keywords

    def do_EHLO(self, rest):
        self._greet(rest, esmtp=True)

    def do_HELO(self, rest):
        self._greet(rest, esmtp=False)

    def _greet(self, rest, esmtp):
        names = [name for name in rest.split(b" ") if name]
        if len(names) != 1:     # T16: stock accepts a missing argument
            raise ProtocolError(replies.EHLO_SYNTAX if esmtp else replies.HELO_SYNTAX,
                                "syntax", "EHLO" if esmtp else "HELO")
        helo = header_safe(names[0].decode("utf-8", "replace"))
        self._txn = None
        self.session.helo, self.esmtp = helo, esmtp
        self.emit("smtp.helo", helo=helo, esmtp=esmtp)
        hostname = self.config.server.hostname
        self.reply(replies.ehlo(hostname, self.ehlo_keywords()) if esmtp
                   else replies.helo(hostname))

    def do_MAIL(self, rest):
        if not self.session.helo:
            raise ProtocolError(replies.NEED_HELO, "sequence", "MAIL before EHLO")
        if self._txn is not None:
            raise ProtocolError(replies.NESTED_MAIL, "sequence", "MAIL in a transaction")
        path, params = self._path_and_params(rest, "FROM:", replies.MAIL_SYNTAX)
        size, kept = self._mail_params(params)
        try:
            sender = parse_path(path, allow_null=True, allow_utf8=bool(kept.get("SMTPUTF8")))
        except AddressError as error:
            raise self._address_error(error, replies.BAD_SENDER) from None
        if size > self.config.server.max_message_size:
            self.reply(replies.TOO_BIG)
            return None
        if not self._space_for(size):
            return None
        d = self.factory.pipeline.at_mail(self.session, sender)
        d.addCallback(self._sender_checked, sender, kept, size)
        return d

    def _space_for(self, size):
        """Answer 452 4.3.1 (or 451 on an error) unless the spool has room."""
        try:
            if self.factory.queue.space_available(size):
                return True
            self.reply(replies.NO_SPACE)
        except Exception:
            _log.failure("spool space check failed")
            self.reply(replies.STORAGE_FAILED)
        return False

    def _sender_checked(self, reply, sender, params, size):
        if reply.positive:
            self._txn = Transaction(sender, params)
            self.emit("smtp.mail", sender=sender.canonical(), size=size)
        self.reply(reply)

    def _path_and_params(self, rest, keyword, syntax):
        """``FROM:<path> PARAMS`` -> (path text, params); ProtocolError if malformed."""
        text = rest.decode("utf-8", "surrogateescape")
        if text[:len(keyword)].upper() != keyword:
            raise ProtocolError(syntax, "syntax", keyword.rstrip(":"))
        try:
            path, tail = split_path(text[len(keyword):].lstrip(" "))
        except AddressError as error:
            raise ProtocolError(syntax, "syntax", str(error)) from None
        if tail and not tail.startswith(" "):
            raise ProtocolError(syntax, "syntax", "no space before parameters")
        return path, _parse_params(tail.split())

    def _mail_params(self, params):
        """SIZE, BODY and SMTPUTF8 checked (T16); -> (declared size, params to keep)."""
        if params and not self.esmtp:
            raise ProtocolError(replies.UNKNOWN_PARAMETER, "bad_parameter",
                                "parameters after HELO")
        unknown = sorted(set(params) - _MAIL_PARAMS)
        if unknown:
            raise ProtocolError(replies.UNKNOWN_PARAMETER, "bad_parameter", unknown[0][:20])
        size = params.get("SIZE", "0")
        if size is None or not size.isdigit() or len(size) > 20:
            raise ProtocolError(replies.BAD_PARAMETER, "bad_parameter", "SIZE")
        kept = {}
        if "BODY" in params:
            kept["BODY"] = (params["BODY"] or "").upper()
            if kept["BODY"] not in ("7BIT", "8BITMIME"):
                raise ProtocolError(replies.BAD_PARAMETER, "bad_parameter", "BODY")
        if "SMTPUTF8" in params:
            if params["SMTPUTF8"] is not None:
                raise ProtocolError(replies.BAD_PARAMETER, "bad_parameter", "SMTPUTF8")
            kept["SMTPUTF8"] = True
        return int(size), kept

    @staticmethod
    def _address_error(error, malformed):
        reply = replies.NON_ASCII_ADDRESS if error.kind == "non_ascii" else malformed
        return ProtocolError(reply, "bad_address", str(error))

    def do_RCPT(self, rest):
        if self._txn is None:
            raise ProtocolError(replies.NEED_MAIL, "sequence", "RCPT before MAIL")
        path, params = self._path_and_params(rest, "TO:", replies.RCPT_SYNTAX)
        if params:
            raise ProtocolError(replies.UNKNOWN_PARAMETER, "bad_parameter",
                                sorted(params)[0][:20])
        try:
            recipient = parse_path(path, allow_utf8=self._txn.utf8, allow_postmaster=True)
        except AddressError as error:
            raise self._address_error(error, replies.BAD_RECIPIENT) from None
        if not recipient.domain:        # <postmaster> is ours (RFC 5321 §4.5.1)
            recipient = Path(recipient.local, self.config.server.domains[0])
        address = recipient.canonical()
        if self._txn.accepted >= self.config.server.max_recipients:
            self._recipient_checked(replies.TOO_MANY_RECIPIENTS, address)
            return None
        if address in self._txn.recipients:
            if not self._junk_command():        # a duplicate RCPT is a junk command
                self._txn.accepted += 1
                self.reply(replies.RECIPIENT_OK)
            return None
        d = self.factory.pipeline.at_rcpt(self.session, recipient)
        d.addCallback(self._recipient_checked, address)
        return d

    def _recipient_checked(self, reply, address):
        if reply.positive:
            self._txn.recipients.append(address)
            self._txn.accepted += 1
            self.emit("smtp.rcpt.accepted", recipient=address)
        else:
            self.emit("smtp.rcpt.rejected", recipient=address, code=reply.code,
                      reason=reply.text, status=reply.status or "")
        self.reply(reply)
        if reply in COUNTED_REFUSALS and not self._closing:
            self._count_error()     # harvesting and relay probing end the session

    def do_DATA(self, rest):
        if rest:
            raise ProtocolError(replies.NO_ARGUMENTS, "syntax", "DATA")
        if self._txn is None:
            raise ProtocolError(replies.NEED_MAIL, "sequence", "DATA before MAIL")
        if not self._txn.recipients:
            raise ProtocolError(replies.NEED_RCPT, "sequence", "DATA before RCPT")
        self._txn.incoming = IncomingMessage(self._body_file, max_head=MAX_HEADER_OCTETS)
        self._txn.body = DataBody(self.config.server.max_message_size, self._txn.incoming)
        self.mode = smtp.DATA
        self._arm(self.config.limits.data_timeout, "data")
        self.reply(replies.START_DATA)

    def do_RSET(self, rest):
        if rest:
            raise ProtocolError(replies.NO_ARGUMENTS, "syntax", "RSET")
        self._txn = None
        self.reply(replies.OK)

    def do_NOOP(self, rest):
        self.reply(replies.OK)

    def do_HELP(self, rest):
        self.reply(replies.HELP)

    def do_VRFY(self, rest):
        self.reply(replies.CANNOT_VRFY)

    def do_QUIT(self, rest):
        self._close_with(replies.BYE)

    # -- STARTTLS (RFC 3207) ------------------------------------------------------

    def do_STARTTLS(self, rest):
        if rest:
            raise ProtocolError(replies.NO_ARGUMENTS, "syntax", "STARTTLS")
        if self.session.tls:
            raise ProtocolError(replies.TLS_ACTIVE, "sequence", "STARTTLS under TLS")
        tls = self.factory.tls
        try:
            tls.context     # reloads if due; fails only when no context was ever loaded
        except TLSError:
            _log.failure("no TLS context for STARTTLS")
            self.reply(replies.TLS_UNAVAILABLE)
            return None
        if not ITLSTransport.providedBy(self.transport):
            self.reply(replies.TLS_UNAVAILABLE)
            return None
        self._discard_pipelined()
        self.reply(replies.READY_FOR_TLS)
        self.transport.startTLS(tls)
        self._reset_for_tls()
        return None

    def _discard_pipelined(self):
        """T1: what came after STARTTLS in the same read was sent in the clear
        and must never run under TLS (stock Twisted runs it: CVE-2011-0411)."""
        octets = self._discard_input()
        if octets:
            self.emit("smtp.starttls.discarded", octets=octets)

    def _reset_for_tls(self):
        """T2: RFC 3207 §4.2, the session starts over (stock keeps the HELO
        name, the transaction and even the authentication)."""
        self.session.tls = True
        self.session.helo = ""
        self.session.auth_user = ""
        self.session.account = None
        self.esmtp = False
        self._txn = None

    def handshakeCompleted(self):
        version, cipher = connection_info(self.transport)
        self.emit("smtp.starttls", listener=self.session.listener, version=version,
                  cipher=cipher, implicit=self.factory.implicit_tls)

    # -- end of DATA: refuse, or spool and answer when it is on disk -----------

    def _body_file(self):
        """A spool file for a body that outgrew memory, or None (a queue without)."""
        open_file = getattr(self.factory.queue, "body_file", None)
        return open_file(self._body_drained) if open_file is not None else None

    def _end_of_data(self):
        txn, self._txn = self._txn, None
        self.mode = smtp.COMMAND
        self._cancel_timer()
        self._body_drained()
        incoming = txn.incoming
        fault = txn.body.fault
        if fault is not None:
            if incoming.file is None:
                return self._refuse_message(fault)
            d = incoming.discard()          # no body file after the reply
            d.addBoth(lambda _: self._refuse_message(fault))
            return d
        now = self.clock.seconds()
        envelope = Envelope(
            queue_id=new_queue_id(now), sender=txn.sender.canonical(),
            recipients=list(txn.recipients), received_at=now, helo=self.session.helo,
            peer_ip=self.session.peer_ip, listener=self.session.listener,
            auth_user=self.session.auth_user, params=dict(txn.params))
        context = dict(session=self.session_id, peer_ip=self.session.peer_ip,
                       queue_id=envelope.queue_id)
        # The policy pipeline checks (mail from outside) or signs (ours) it,
        # off the reactor thread; then the spool. A body in a file is read
        # back by the checks' thread (BodyDigests), never into memory whole.
        received = self._received(txn, envelope)
        d = incoming.finish()
        d.addCallback(self._at_data, envelope, received, context)
        d.addCallback(self._store, envelope, incoming)
        d.addCallbacks(self._queued, self._not_queued,
                       callbackArgs=(envelope,), errbackArgs=(envelope, incoming))
        return d

    def _at_data(self, incoming, envelope, received, context):
        digests = None if incoming.file is None else BodyDigests(incoming.file.pieces)
        return self.factory.pipeline.at_data(self.session, envelope, incoming.front(),
                                             received, context, body_digests=digests)

    def _store(self, front, envelope, incoming):
        if self._closing:
            incoming.discard()
            return None     # the client left without a 250: it will send again
        message, envelope.size = incoming.to_spool(front)
        return self.factory.queue.accept(envelope, message)

    def _received(self, txn, envelope):
        with_ = protocol_name(self.esmtp, tls=self.session.tls,
                              auth=bool(self.session.auth_user), utf8=txn.utf8)
        return received_header(
            helo=self.session.helo, peer_ip=self.session.peer_ip,
            hostname=self.config.server.hostname, with_=with_,
            queue_id=envelope.queue_id, recipients=envelope.recipients,
            when=envelope.received_at, utf8=txn.utf8)

    def _refuse_message(self, fault):
        reply = {"bare_cr_lf": replies.BARE_CR_LF_DATA,
                 "long_line": replies.DATA_LINE_TOO_LONG,
                 "too_big": replies.TOO_BIG}[fault]
        self.emit("smtp.message.rejected", code=reply.code, reason=reply.text)
        if fault == "too_big":
            self.reply(reply)
        else:
            self._protocol_error(reply, fault, "data")

    def _queued(self, result, envelope):
        if self._closing:
            return
        queue_id = result if isinstance(result, str) and result else envelope.queue_id
        self.messages += 1
        self.emit("smtp.message.accepted", queue_id=queue_id, sender=envelope.sender,
                  recipients=list(envelope.recipients), size=envelope.size,
                  account=envelope.auth_user)
        self.reply(replies.queued(queue_id))

    def _not_queued(self, failure, envelope, incoming):
        """T10: a storage failure is temporary (451), never stock's permanent 550.
        A step before the spool (DKIM signing) may fail with an exception
        carrying its own ``smtp_reply``; it has logged its reason itself.
        A body file is gone before the reply."""
        if incoming.file is None:
            return self._refuse_stored(failure, envelope)
        d = incoming.discard()
        d.addBoth(lambda _: self._refuse_stored(failure, envelope))
        return d

    def _refuse_stored(self, failure, envelope):
        if failure.check(Refused):
            self.emit("smtp.message.rejected", code=failure.value.reply.code,
                      reason=failure.value.reply.text)
            self.reply(failure.value.reply)
            return
        reply = getattr(failure.value, "smtp_reply", None)
        if reply is None:
            _log.failure("spool refused {queue_id}", failure, queue_id=envelope.queue_id)
            reply = replies.STORAGE_FAILED
        self.emit("smtp.message.rejected", code=reply.code, reason=reply.text)
        self.reply(reply)


class SMTPFactory(GatedFactory):
    """Builds ``ApplianceSMTP`` sessions for one listener and counts them per IP.

    ``clock`` is the reactor (callLater, seconds) or a ``task.Clock`` in
    tests; ``policy`` defaults to the MX rules. ``tls`` (an
    ``appliance.net.tls.ServerTLS``) enables STARTTLS; with ``implicit_tls`` the
    listener wraps every connection in TLS itself and STARTTLS is not offered.
    """

    protocol = ApplianceSMTP
    noisy = False               # sessions are logged as events, not as factory chatter

    def __init__(self, config, directory, queue, clock, listener="mx", policy=None,
                 tls=None, implicit_tls=False, gate=None):
        super().__init__(config, clock, listener, tls, implicit_tls, gate)
        self.directory = directory
        self.queue = queue      # accept(envelope, message), space_available(size)
        self.policy = policy if policy is not None else MXPolicy(config, directory)
        self.pipeline = Pipeline(self.policy, config.relay.trusted_networks)

    # The pipeline's DKIM signer (our users' mail) and inbound checks (mail
    # from outside): tap.py builds the pipeline whole; tests set these.
    signer = property(lambda self: self.pipeline.signer,
                      lambda self, signer: setattr(self.pipeline, "signer", signer))
    checks = property(lambda self: self.pipeline.checks,
                      lambda self, checks: setattr(self.pipeline, "checks", checks))

    def refusal(self, session_protocol, verdict):
        """The Reply to close a refused connection with. Deny networks are
        refused even if also allowed; allow networks are never limited. T23:
        stock LimitConnectionsByPeer drops the connection without a word."""
        if verdict == DENIED:
            session_protocol.emit("smtp.denied")
        else:
            session_protocol.emit("smtp.limit", kind=stages.LIMIT_KIND.get(verdict, verdict))
        return stages.REFUSED[verdict]
