"""The submission profile: ESMTP with SASL AUTH on 587, 2525 and 465.

Same protocol as the MX listener (``appliance.receive.smtp``) plus AUTH, with
the rules stock twisted.mail gets wrong (TWISTED-TRAPS T4-T6):

- AUTH is offered and accepted only under TLS (538 5.7.11 before it);
- only after EHLO, outside a transaction, once (503 5.5.1);
- responses are strict base64; a malformed one is 501 5.5.2, ``*`` 501 5.7.0;
- a PLAIN authorization identity other than the user is 535 5.7.8;
- three failures on one connection end it (421 4.7.0);
- a backend that cannot answer is 454 4.7.0, never a wrong-password 535.

The mechanisms (``appliance.auth.sasl``) and the account store
(``appliance.auth.accounts``) know nothing of SMTP; IMAP and POP3 reuse them.
After AUTH, ``SubmissionPolicy`` holds MAIL FROM to the account's addresses
and its ``check_message`` holds the From: header to them.
"""

import re

from twisted.mail import smtp

from appliance.auth.outcome import ABORTED, UNAVAILABLE, LoginRecorder
from appliance.auth.sasl import Challenge, Malformed, encode_challenge, respond
from appliance import replies
from appliance.policy.relay import SubmissionPolicy
from appliance.receive.smtp import ApplianceSMTP, ProtocolError, SMTPFactory

AUTH = "AUTH"                   # the protocol mode while a SASL exchange runs
AUTH_LINE_LIMIT = 12288         # octets, RFC 4954 §4 (OAuth tokens are long)
MAX_AUTH_FAILURES = 3           # per connection; the auditor bans across connections
_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}\Z")


class SubmissionSMTP(ApplianceSMTP):
    """One submission session (``SubmissionFactory`` builds it)."""

    commands = ApplianceSMTP.commands | {"AUTH"}
    unimplemented = ApplianceSMTP.unimplemented - {"AUTH"}

    def __init__(self, factory):
        super().__init__(factory)
        self._sasl = None
        self.logins = LoginRecorder(self)

    def ehlo_keywords(self):
        keywords = super().ehlo_keywords()
        if self.session.tls:        # T4: never offered in the clear
            keywords.append("AUTH " + " ".join(self.factory.mechanisms.names()))
        return keywords

    def _line_limit(self):
        """AUTH lines may be longer than commands (RFC 4954 §4): while an
        exchange runs, and for the AUTH command itself under TLS."""
        if self.mode == AUTH:
            return AUTH_LINE_LIMIT
        if self.mode == smtp.COMMAND and self.session.tls and self.session.account is None:
            return AUTH_LINE_LIMIT
        return super()._line_limit()

    # -- AUTH ---------------------------------------------------------------------

    def do_AUTH(self, rest):
        self._check_auth_allowed()
        words = rest.split(b" ")
        if not rest or len(words) > 2 or not all(words) or not _MECHANISM.match(words[0]):
            raise ProtocolError(replies.AUTH_SYNTAX, "syntax", "AUTH")
        mechanism = self.factory.mechanisms.create(words[0].decode("ascii"))
        if mechanism is None:
            raise ProtocolError(replies.AUTH_MECHANISM, "bad_parameter",
                                words[0].decode("ascii"))
        self._sasl = mechanism
        return self._sasl_line(words[1] if len(words) == 2 else None)

    def _check_auth_allowed(self):
        """T4/T5: stock accepts AUTH in the clear, before EHLO, in a
        transaction and again after success."""
        if not (self.session.helo and self.esmtp):
            raise ProtocolError(replies.AUTH_NEED_EHLO, "sequence", "AUTH before EHLO")
        if not self.session.tls:
            raise ProtocolError(replies.ENCRYPTION_REQUIRED, "auth_before_tls",
                                "AUTH without TLS")
        if self.session.account is not None:
            raise ProtocolError(replies.AUTH_ALREADY, "sequence", "AUTH after AUTH")
        if self._txn is not None:
            raise ProtocolError(replies.AUTH_IN_TRANSACTION, "sequence", "AUTH in a transaction")

    def state_AUTH(self, line):
        return self._sasl_line(line)

    def _dispatch(self, line):
        """A response line with a bare CR/LF or over the limit ends the
        exchange; the base class answers the line itself (500)."""
        if self.mode == AUTH and (line.too_long or line.bare):
            self._end_sasl()
        return super()._dispatch(line)

    def _unfinished_line(self):
        if self.mode == AUTH and self._framer.overflowing:
            self._end_sasl()
        super()._unfinished_line()

    def _sasl_line(self, line):
        """Feed the client's response to the mechanism; answer its outcome."""
        return respond(self._sasl, line).addCallbacks(self._sasl_next, self._sasl_failed)

    def _sasl_next(self, result):
        if isinstance(result, Challenge):
            self.mode = AUTH
            self.reply(replies.challenge(encode_challenge(result.data).decode("ascii")))
            return
        mechanism = self._end_sasl()
        self.session.account = result
        self.session.auth_user = result.address
        self.logins.succeeded(mechanism.name, result.address)
        self.reply(replies.AUTH_OK)

    def _sasl_failed(self, failure):
        mechanism = self._end_sasl()
        verdict = self.logins.failed(failure, mechanism.name, mechanism.identity,
                                     mechanism.fingerprint)
        if verdict == ABORTED:
            self.reply(replies.AUTH_CANCELLED)
            return
        if verdict == UNAVAILABLE:
            self.reply(replies.AUTH_UNAVAILABLE)
            return
        self.reply(replies.AUTH_MALFORMED if failure.check(Malformed) else replies.AUTH_FAILED)
        if self.logins.banned:
            # The ban was placed before that answer (LoginRecorder): the
            # client's other sessions are closed already, this one now.
            self.defence_close()
            return
        if self.logins.failures >= MAX_AUTH_FAILURES and not self._closing:
            self.emit("smtp.limit", kind="auth_failures")
            self._close_with(replies.TOO_MANY_AUTH_FAILURES)

    def _end_sasl(self):
        mechanism, self._sasl = self._sasl, None
        if self.mode == AUTH:
            self.mode = smtp.COMMAND
        return mechanism

    def _reset_for_tls(self):
        super()._reset_for_tls()
        self._sasl = None



class SubmissionFactory(SMTPFactory):
    """Sessions for one submission listener.

    ``mechanisms`` is an ``appliance.auth.sasl.Mechanisms``; ``tls`` the
    ``ServerTLS``; ``implicit_tls`` for 465, where the listener itself wraps
    connections in TLS.
    """

    protocol = SubmissionSMTP

    def __init__(self, config, directory, queue, clock, listener, mechanisms, tls,
                 implicit_tls=False, policy=None, gate=None):
        super().__init__(config, directory, queue, clock, listener,
                         policy if policy is not None else SubmissionPolicy(config, directory),
                         tls=tls, implicit_tls=implicit_tls, gate=gate)
        self.mechanisms = mechanisms
