"""Who may send what to whom: the relay rules of the MX and submission listeners.

A policy answers with a ``Reply`` (or a Deferred firing with one); the
protocol only relays the answer. ``SubmissionPolicy`` is the submission
ports' (AUTH required, sender ownership, any recipient domain).
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.auth.accounts import BackendUnavailable
from appliance.auth.ownership import may_send_as, may_send_as_all
from appliance import replies
from appliance.headers import addresses_in_name
from appliance.message import AmbiguousFrom, from_mailboxes
from appliance.net.peer import peer_in

_log = Logger()


def _known(targets):
    """The reply to a local recipient the directory resolved to ``targets``."""
    return replies.RECIPIENT_OK if targets else replies.USER_UNKNOWN


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
        """The Reply for RCPT TO ``recipient`` (a Path): a Reply when the
        directory answered at once, else a Deferred firing with one."""
        address = recipient.canonical()
        try:
            is_local = self.directory.is_local_domain(address.rpartition("@")[2])
            if isinstance(is_local, defer.Deferred):
                is_local.addCallback(self._local_or_relay, session, address)
                return is_local.addErrback(self._lookup_failed, address)
            answer = self._local_or_relay(is_local, session, address)
        except Exception:  # noqa: BLE001 - as a failed lookup, like the Deferred path
            return self._lookup_failed(Failure(), address)
        if isinstance(answer, defer.Deferred):
            answer.addErrback(self._lookup_failed, address)
        return answer

    def _local_or_relay(self, is_local, session, address):
        if not is_local:
            if peer_in(self.config.relay.trusted_networks, session.peer_ip):
                return replies.RECIPIENT_OK
            return replies.RELAY_DENIED
        targets = self.directory.resolve(address)
        if isinstance(targets, defer.Deferred):
            return targets.addCallback(_known)
        return _known(targets)

    def check_message(self, session, body):
        """A Reply refusing the message ``body`` (bytes, CRLF) after DATA, or
        None (or a Deferred of either): the MX listener takes any content
        (the checks judge it)."""
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

    ``session.account`` is the authenticated ``Account``;
    ``appliance.auth.ownership.may_send_as`` decides the sender (own
    address, the aliases that reach it, ``+tag`` forms that are no one
    else's). The null sender stays allowed: it is what a
    user's own vacation replies and delivery reports use.
    """

    def check_sender(self, session, sender):
        if session.account is None:
            return replies.AUTH_REQUIRED
        if sender.is_null:
            return replies.SENDER_OK
        address = sender.canonical()
        d = may_send_as(self.directory, session.account, address)
        d.addCallbacks(lambda ok: replies.SENDER_OK if ok else replies.SENDER_NOT_OWNED,
                       self._lookup_failed, errbackArgs=(address,))
        return d

    def check_recipient(self, session, recipient):
        if session.account is None:
            return replies.AUTH_REQUIRED
        return super().check_recipient(session, recipient)

    def _local_or_relay(self, is_local, session, address):
        if not is_local:
            return replies.RECIPIENT_OK         # authenticated: any domain
        return super()._local_or_relay(is_local, session, address)

    def check_message(self, session, body):
        """Every From: address must be the account's (550 5.7.1 otherwise),
        and so must any address a display name spells out (``"bob@example.test"
        <alice@...>`` reads as bob in a mail client). A Reply, None, or a
        Deferred of either (a ``+tag`` form asks the directory)."""
        try:
            mailboxes = from_mailboxes(body)
        except AmbiguousFrom:
            return replies.FROM_NOT_OWNED
        account = session.account
        if not mailboxes:
            return replies.FROM_MISSING
        if account is None:
            return replies.FROM_NOT_OWNED
        addresses = [m.address for m in mailboxes]
        for mailbox in mailboxes:
            addresses.extend(addresses_in_name(mailbox.name))
        d = may_send_as_all(self.directory, account, addresses)
        d.addCallbacks(lambda ok: None if ok else replies.FROM_NOT_OWNED,
                       self._lookup_failed, errbackArgs=("From:",))
        return d
