"""The gate: the one place where a new connection is let in or refused.

``tap.py`` builds one ``Gate`` and hands it to every listener's factory
(SMTP, IMAP, POP3 and those to come), so a client's connections are counted
across all ports, and a deny entry or a limit reaches every listener at
once. Each protocol words a refusal its own way (SMTP ``421``, IMAP
``* BYE``, POP3 ``-ERR``); the gate only decides, before any banner, TLS
handshake or lookup is spent on the client.
"""

from twisted.internet import protocol

from appliance.net.peer import peer_in

DENIED = "denied"
BUSY = "busy"


class Gate:
    """Deny/allow lists and per-IP connection counts, across every listener.

    ``admit(ip)`` answers None (let in and counted), DENIED or BUSY. Deny wins
    over allow; allowed networks are never limited. T23: stock
    LimitConnectionsByPeer drops the connection without a word.
    """

    def __init__(self, limits):
        self.limits = limits
        self._per_ip = {}

    @property
    def connections(self):
        """Open connections on every listener."""
        return sum(self._per_ip.values())

    def count(self, ip):
        """Open connections from ``ip`` on every listener."""
        return self._per_ip.get(ip, 0)

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
    in or refused by ``self.gate`` (sessions have ``peer_ip``). The protocol's
    own words for a refusal, and its event, come from ``refusal(session,
    verdict)`` (verdict DENIED or BUSY). ``gate`` is the appliance's one Gate;
    a factory built without one (a unit test) gets a gate of its own.
    """

    connections = 0             # open sessions on this listener

    def use_gate(self, gate, limits):
        self.gate = gate if gate is not None else Gate(limits)

    def buildProtocol(self, addr):
        return self.protocol(self)

    def admit(self, session):
        """None to let the connection in, or what to close it with."""
        verdict = self.gate.admit(session.peer_ip)
        if verdict is not None:
            return self.refusal(session, verdict)
        self.connections += 1
        return None

    def release(self, session):
        self.connections -= 1
        self.gate.release(session.peer_ip)

    def refusal(self, session, verdict):
        raise NotImplementedError
