"""The gate: the one place where a new connection is let in or refused.

``tap.py`` builds one ``Gate`` and hands it to every listener's factory
(SMTP, IMAP, POP3 and those to come), so a client's connections are counted
across all ports, and a deny entry or a limit reaches every listener at
once. Each protocol words a refusal its own way (SMTP ``421``, IMAP
``* BYE``, POP3 ``-ERR``); the gate only decides, before any banner, TLS
handshake or lookup is spent on the client.
"""

from twisted.internet import protocol

from appliance.net.peer import peer_in, peer_ip


# What the gate (and the defences behind it) answer about a new connection.
DENIED = "denied"       # a [limits] deny network
BANNED = "banned"       # a ban in force
BUSY = "busy"           # connections_per_ip reached
RATE = "rate"           # connections_per_minute_per_ip reached


class Gate:
    """Deny/allow lists and per-IP connection counts, across every listener.

    ``admit(ip)`` answers None (let in and counted), DENIED or BUSY. Deny wins
    over allow; allowed networks are never limited. T23: stock
    LimitConnectionsByPeer drops the connection without a word.
    """

    def __init__(self, limits, defences=None):
        self.limits = limits
        self._per_ip = {}
        #: ``appliance.defence.service.Defences`` (the server's): bans,
        #: connection rates and counts per client network, the sessions a
        #: ban ends. None (unit tests of one protocol): the lists and
        #: per-IP counts below only.
        self.defences = defences

    @property
    def connections(self):
        """Open connections on every listener."""
        if self.defences is not None:
            return self.defences.admission.connections
        return sum(self._per_ip.values())

    def count(self, ip):
        """Open connections from ``ip`` on every listener."""
        if self.defences is not None:
            return self.defences.admission.open_from(ip)
        return self._per_ip.get(ip, 0)

    def refuses(self, ip, listener=""):
        """The verdict for ``ip`` without counting anything (a listener's
        front door asks it before even building a protocol)."""
        if self.defences is not None:
            return self.defences.admission.screen(ip, listener)
        return DENIED if peer_in(self.limits.deny, ip) else None

    def admit(self, ip, session=None):
        if self.defences is not None:
            closer = getattr(session, "defence_close", None)
            listener = getattr(getattr(session, "factory", None), "listener", "")
            verdict, ticket = self.defences.admission.admit(ip, closer, listener)
            if ticket is not None and session is not None:
                session.defence_ticket = ticket
            return verdict
        if peer_in(self.limits.deny, ip):
            return DENIED
        if (not peer_in(self.limits.allow, ip)
                and self._per_ip.get(ip, 0) >= self.limits.connections_per_ip):
            return BUSY
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return None

    def release(self, ip, session=None):
        if self.defences is not None:
            self.defences.admission.release(getattr(session, "defence_ticket", None))
            if session is not None:
                session.defence_ticket = None
            return
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

    def __init__(self, config, clock, listener, tls=None, implicit_tls=False, gate=None):
        """What every mail listener has: ``listener`` names it in events;
        ``tls``, a ``ServerTLS``, offers STARTTLS (STLS) unless ``implicit_tls``
        says the listener wraps every connection in TLS itself."""
        self.config = config
        self.clock = clock
        self.listener = listener
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.use_gate(gate, config.limits)

    def use_gate(self, gate, limits):
        self.gate = gate if gate is not None else Gate(limits)
        self._admitted = set()      # the sessions let in and not yet released

    @property
    def connections(self):
        """Open sessions on this listener."""
        return len(self._admitted)

    def buildProtocol(self, addr):
        return self.protocol(self)

    def admit(self, session):
        """None to let the connection in, or what to close it with."""
        verdict = self.gate.admit(session.peer_ip, session)
        if verdict is not None:
            return self.refusal(session, verdict)
        self._admitted.add(session)
        return None

    def release(self, session):
        """A connection's end: its place is given back (a refused session,
        or one released already, had none)."""
        if session in self._admitted:
            self._admitted.discard(session)
            self.gate.release(session.peer_ip, session)

    # -- the defences, for the protocols (no-ops without them) ---------------------

    @property
    def defences(self):
        return getattr(self.gate, "defences", None)

    def auth_failed(self, session, account, fingerprint=None):
        """Count a failed login of ``session`` (call it before answering);
        -> True when it banned the client: answer, then close the session
        with the protocol's words (its other sessions are closed already)."""
        defences = self.defences
        if defences is None:
            return False
        ban = defences.auth_failed(session.peer_ip, account, fingerprint,
                                   getattr(session, "defence_ticket", None))
        return ban is not None

    def auth_succeeded(self, session, account):
        if self.defences is not None:
            self.defences.auth_succeeded(session.peer_ip, account)

    def junk_counter(self, session):
        """A per-session ``JunkCounter`` (``count()`` True: close with 421),
        or None without defences."""
        defences = self.defences
        if defences is None or defences.exempt.contains(session.peer_ip):
            return None         # allow and trusted networks are never limited
        return defences.junk_counter(session.peer_ip)

    def refusal(self, session, verdict):
        raise NotImplementedError


class _Refusal(protocol.Protocol):
    """Writes the protocol's refusal and closes: no session, no events of
    its own (the gate reports refusals, at most one a minute per network)."""

    def __init__(self, words):
        self.words = words

    def connectionMade(self):
        self.transport.write(self.words)
        self.transport.loseConnection()


class GateFront(protocol.ServerFactory):
    """In front of a listener's factory: a client the gate refuses (deny,
    ban, too many open connections) costs no session object, no event per
    connection, no TLS state. ``words(verdict)`` -> bytes: the protocol's
    refusal (SMTP 421, IMAP * BYE, POP3 -ERR); None for implicit-TLS
    listeners, closed at once without a handshake (SPEC §4: "or a plain
    close"). What only counting can tell (the connection rate) is refused
    by the session itself, before its banner.
    """

    noisy = False

    def __init__(self, gate, wrapped, listener="", words=None):
        self.gate = gate
        self.wrapped = wrapped
        self.listener = listener
        self.words = words

    def doStart(self):
        self.wrapped.doStart()

    def doStop(self):
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        verdict = self.gate.refuses(peer_ip(addr), self.listener)
        if verdict is None:
            return self.wrapped.buildProtocol(addr)
        if self.words is None:
            return None         # the reactor closes the socket at once
        return _Refusal(self.words(verdict))
