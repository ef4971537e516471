"""Who may send what to whom: the MX listener's rules, apart from the protocol.

A policy answers with a ``Reply`` (or a Deferred firing with one); the
protocol only relays the answer. ``SubmissionPolicy`` is the submission
ports' (AUTH required, sender ownership, any recipient domain).
"""

import functools
import ipaddress

from twisted.internet import defer, protocol
from twisted.logger import Logger

from appliance.auth.accounts import BackendUnavailable
from appliance.auth.ownership import may_send_as
from appliance.receive import replies

_log = Logger()


def peer_in(networks, peer_ip):
    """True when ``peer_ip`` (a string) lies in one of ``networks``."""
    if not networks:
        return False
    ip = _ip(peer_ip)
    return ip is not None and any(ip in network for network in networks)


@functools.lru_cache(maxsize=4096)
def _ip(text):
    """The parsed address (asked several times per connection), or None."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:          # not an IP peer (a UNIX socket in tests)
        return None


DENIED = "denied"
BUSY = "busy"


class ConnectionGate:
    """The deny/allow lists and per-IP connection counts, shared by every listener.

    ``admit(ip)`` answers None (let in and counted), DENIED or BUSY; each
    protocol turns that into its own reply (T23: stock LimitConnectionsByPeer
    drops the connection without a word). Deny wins over allow; allowed
    networks are never limited.
    """

    def __init__(self, limits):
        self.limits = limits
        self._per_ip = {}

    @property
    def connections(self):
        return sum(self._per_ip.values())

    def admit(self, ip):
        if peer_in(self.limits.deny, ip):
            return DENIED
        if (not peer_in(self.limits.allow, ip)
                and self._per_ip.get(ip, 0) >= self.limits.connections_per_ip):
            return BUSY
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return None

    def release(self, ip):
        remaining = self._per_ip.get(ip, 0) - 1
        if remaining > 0:
            self._per_ip[ip] = remaining
        else:
            self._per_ip.pop(ip, None)


class GatedFactory(protocol.ServerFactory):
    """What every listener's factory shares: one session per connection, let
    in or refused by ``self.gate`` (a ConnectionGate; sessions have
    ``peer_ip``). The protocol's own words for a refusal, and its event,
    come from ``refusal(session, verdict)`` (verdict DENIED or BUSY).
    """

    def buildProtocol(self, addr):
        return self.protocol(self)

    @property
    def connections(self):
        """Open sessions on this listener."""
        return self.gate.connections

    def admit(self, session):
        """None to let the connection in, or what to close it with."""
        verdict = self.gate.admit(session.peer_ip)
        return None if verdict is None else self.refusal(session, verdict)

    def release(self, session):
        self.gate.release(session.peer_ip)

    def refusal(self, session, verdict):
        raise NotImplementedError


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
