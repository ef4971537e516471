"""Who may send what to whom: the relay rules of the MX and submission listeners.

A policy answers with a ``Reply`` (or a Deferred firing with one); the
protocol only relays the answer. ``SubmissionPolicy`` is the submission
ports' (AUTH required, sender ownership, any recipient domain).
"""

from twisted.internet import defer
from twisted.logger import Logger

from appliance.auth.accounts import BackendUnavailable
from appliance import replies
from appliance.message import AmbiguousFrom, from_addresses
from appliance.net.peer import peer_in

_log = Logger()


class MXPolicy:
    """Mail for our domains from anyone; relay only for trusted networks.

    ``directory`` is the Directory interface (is_local_domain, resolve); its
    answers may be plain values or Deferreds.
    """

    def __init__(self, config, directory):
        self.config = config
        self.directory = directory

    def check_sender(self, session, sender):
        """Any sender, the null one included (SPF and friends are checks of their own)."""
        return replies.SENDER_OK

    def check_recipient(self, session, recipient):
        """A Deferred firing with the Reply for RCPT TO ``recipient`` (a Path)."""
        address = recipient.canonical()
        d = defer.maybeDeferred(self.directory.is_local_domain,
                                address.rpartition("@")[2])
        d.addCallback(self._local_or_relay, session, address)
        d.addErrback(self._lookup_failed, address)
        return d

    def _local_or_relay(self, is_local, session, address):
        if not is_local:
            if peer_in(self.config.relay.trusted_networks, session.peer_ip):
                return replies.RECIPIENT_OK
            return replies.RELAY_DENIED
        d = defer.maybeDeferred(self.directory.resolve, address)
        d.addCallback(lambda targets: replies.RECIPIENT_OK if targets
                      else replies.USER_UNKNOWN)
        return d

    def check_message(self, session, body):
        """A Reply refusing the message ``body`` (bytes, CRLF) after DATA, or
        None: the MX listener takes any content (the checks judge it)."""
        return None

    def _lookup_failed(self, failure, address):
        if failure.check(BackendUnavailable):
            # An outage, already reported once by the backend (ldap.unavailable):
            # one line per RCPT, not a traceback each.
            _log.warn("directory lookup for {address} failed: {why}",
                      address=address, why=failure.getErrorMessage())
        else:
            _log.failure("directory lookup for {address} failed", failure, address=address)
        return replies.LOOKUP_FAILED


class SubmissionPolicy(MXPolicy):
    """The submission ports: nothing before AUTH, then the account's own
    addresses as sender and any recipient domain.

    ``session.account`` is the authenticated ``Account``; its
    ``may_send_as`` decides the sender (own address, ``+tag`` forms and the
    aliases that reach it). The null sender stays allowed: it is what a
    user's own vacation replies and delivery reports use.
    """

    def check_sender(self, session, sender):
        if session.account is None:
            return replies.AUTH_REQUIRED
        if sender.is_null or session.account.may_send_as(sender.canonical()):
            return replies.SENDER_OK
        return replies.SENDER_NOT_OWNED

    def check_recipient(self, session, recipient):
        if session.account is None:
            return replies.AUTH_REQUIRED
        return super().check_recipient(session, recipient)

    def _local_or_relay(self, is_local, session, address):
        if not is_local:
            return replies.RECIPIENT_OK         # authenticated: any domain
        return super()._local_or_relay(is_local, session, address)

    def check_message(self, session, body):
        """Every From: address must be the account's (550 5.7.1 otherwise)."""
        try:
            addresses = from_addresses(body)
        except AmbiguousFrom:
            return replies.FROM_NOT_OWNED
        account = session.account
        if not addresses:
            return replies.FROM_MISSING
        if account is None or not all(account.may_send_as(a) for a in addresses):
            return replies.FROM_NOT_OWNED
        return None
