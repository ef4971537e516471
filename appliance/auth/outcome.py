"""How a login ended, the same way on every protocol.

SMTP AUTH, IMAP LOGIN/AUTHENTICATE and POP3 USER/PASS/AUTH all end in one of
three ways: authenticated, refused (bad credentials or a malformed exchange:
it counts against the client) or not decided (the backend is down, or
something failed inside: never the client's fault). ``judge`` sorts a
failure; ``LoginRecorder`` writes the ``auth.*`` events and tells the
``watchers`` (the defences count failures there, before the protocol sends
its reply) — one place for all three protocols.
"""

from twisted.logger import Logger

from appliance import events
from appliance.auth.accounts import BackendUnavailable, BadCredentials
from appliance.auth.sasl import Aborted, Malformed
from appliance.message import header_safe

ABORTED = "aborted"             # the client cancelled the exchange (``*``)
REFUSED = "refused"             # bad credentials or a malformed exchange
UNAVAILABLE = "unavailable"     # the backend is down, or an internal error

_log = Logger()

for _name, _description, _fields in (
    ("auth.success", "a client authenticated",
     ("session", "peer_ip", "listener", "mechanism", "account")),
    ("auth.failure", "authentication failed: bad credentials or a malformed exchange",
     ("session", "peer_ip", "listener", "mechanism", "account", "reason")),
    ("auth.unavailable", "authentication could not be checked: the backend is down",
     ("session", "peer_ip", "listener", "mechanism", "account", "reason")),
):
    events.register(_name, _description, _fields)


def reason_of(failure):
    """A failure's message as one safe line for an event."""
    return header_safe(str(failure.value))[:200] or type(failure.value).__name__


def judge(failure):
    """``(ABORTED | REFUSED | UNAVAILABLE, reason)`` for a failed login."""
    if failure.check(Aborted):
        return ABORTED, "cancelled"
    if failure.check(BackendUnavailable):
        return UNAVAILABLE, reason_of(failure)
    if failure.check(Malformed):
        return REFUSED, "malformed: " + reason_of(failure)
    if failure.check(BadCredentials):
        return REFUSED, reason_of(failure)
    _log.failure("authentication failed unexpectedly", failure)
    return UNAVAILABLE, "internal error"


class LoginRecorder:
    """Records the logins of one session (SMTP, IMAP or POP3).

    ``session`` is the protocol: its ``emit(name, **fields)`` adds the
    session id and peer IP, its ``factory.listener`` names the port.
    ``failures`` counts refusals on this connection (each protocol closes
    after a few).

    The defences hear of every outcome through the session's factory
    (``GatedFactory.auth_failed`` / ``auth_succeeded``): a refusal is
    counted for the client's network, and a ban it causes is in place
    before the protocol answers. ``banned`` is then True: the protocol
    sends its failure reply and closes with its ban words.
    """

    def __init__(self, session):
        self._session = session
        self.failures = 0
        self.banned = False

    def _emit(self, name, **fields):
        self._session.emit(name, **fields)

    def _fields(self, mechanism, identity):
        return dict(listener=self._session.factory.listener, mechanism=mechanism,
                    account=header_safe(identity or "")[:256])

    def succeeded(self, mechanism, address):
        self._emit("auth.success", **self._fields(mechanism, address))
        self._session.factory.auth_succeeded(self._session, address)

    def failed(self, failure, mechanism, identity, fingerprint=None):
        """Record a failed login; its verdict (see ``judge``) for the reply.
        ``fingerprint``: the HMAC of the credential tried
        (``appliance.auth.sasl.fingerprint``; mechanisms keep it)."""
        verdict, reason = judge(failure)
        if verdict == REFUSED:
            self.refused(mechanism, identity, reason, fingerprint)
        elif verdict == UNAVAILABLE:
            self._emit("auth.unavailable", reason=reason, **self._fields(mechanism, identity))
        return verdict

    def refused(self, mechanism, identity, reason, fingerprint=None):
        self.failures += 1
        self._emit("auth.failure", reason=reason, **self._fields(mechanism, identity))
        if self._session.factory.auth_failed(self._session, identity or "", fingerprint):
            self.banned = True
