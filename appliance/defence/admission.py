"""What the gate asks when a client connects, on every listener, and the
registry of open sessions that a ban ends.

``Admission.admit(ip, closer)`` -> ``(verdict, ticket)``: verdict None lets
the client in (the ticket is counted and registered until ``release``);
otherwise it is one of ``DENIED``, ``BANNED``, ``BUSY`` (connections_per_ip,
counted across all listeners) or ``RATE`` (connections_per_minute_per_ip),
and the caller refuses with its protocol's words (SMTP ``421 4.7.0``, IMAP
``* BYE``, POP3 ``-ERR``, SSH: close) before any TLS, banner or DNS work.

Order: ``deny`` wins over everything; ``allow`` and ``trusted_networks`` are
never banned or limited; then bans, concurrent connections, the rate.

``closer`` (called with no argument) ends an open session with the
protocol's own words; a ban calls it for every open session of the banned
network (SPEC §4). Refusals are events (``defence.refused``), at most one per
network and verdict per ``REFUSAL_EVENT_INTERVAL`` with the count since the
last one, so a flood of banned connections does not flood the event log.
"""

from appliance import events
from appliance.net.gate import BANNED, BUSY, DENIED, RATE  # noqa: F401  (the verdicts)
from appliance.defence.network import client_key, normalise


REFUSAL_EVENT_INTERVAL = 60.0

for _name, _description, _fields in (
    ("defence.refused", "connections refused at connect (verdict: denied, banned, busy, "
     "rate); count refusals of that network since the last such event, at most one a minute",
     ("peer_ip", "network", "listener", "verdict", "count")),
    ("defence.sessions_closed", "a ban ended the open sessions of the banned network",
     ("network", "count")),
):
    events.register(_name, _description, _fields)


class Ticket:
    """One admitted connection: its client key and how to end it."""

    __slots__ = ("key", "ip", "closer", "listener")

    def __init__(self, key, ip, closer, listener):
        self.key, self.ip, self.closer, self.listener = key, ip, closer, listener


class Admission:
    """See the module doc. ``deny`` and ``exempt`` are ``Networks``;
    ``bans`` a ``Bans``; ``rates`` a ``Rates``; ``clock`` for the events."""

    def __init__(self, limits, bans, rates, deny, exempt, clock):
        self.connections_per_ip = limits.connections_per_ip
        self.ipv6_prefix = limits.ipv6_prefix
        self.bans = bans
        self.rates = rates
        self.deny = deny
        self.exempt = exempt
        self.clock = clock
        self._open = {}             # client key -> {Ticket}
        self._refusals = {}         # (key, verdict) -> [time of last event, count since]
        self.connections = 0
        #: The ticket of the session whose failure is placing a ban right
        #: now: it answers that failure first and then closes itself.
        self.sparing = None
        bans.on_ban.append(self.close_network)

    def check(self, ip):
        """The verdict for a new connection of ``ip``, counting nothing."""
        if self.deny and self.deny.contains(ip):
            return DENIED
        if self.exempt.contains(ip):
            return None
        if self.bans.is_banned(ip) is not None:
            return BANNED
        key = client_key(ip, self.ipv6_prefix)
        if len(self._open.get(key, ())) >= self.connections_per_ip:
            return BUSY
        return None

    def screen(self, ip, listener=""):
        """``check`` for a listener's front door: the verdict, counting
        nothing, a refusal reported like one at ``admit``."""
        verdict = self.check(ip)
        if verdict is not None:
            self._refused(ip, verdict, listener)
        return verdict

    def admit(self, ip, closer=None, listener=""):
        """-> (verdict, ticket); see the module doc."""
        verdict = self.check(ip)
        if verdict is None and not self.exempt.contains(ip) and not self.rates.connection(ip):
            verdict = RATE
        if verdict is not None:
            self._refused(ip, verdict, listener)
            return verdict, None
        key = client_key(ip, self.ipv6_prefix)
        ticket = Ticket(key, ip, closer, listener)
        self._open.setdefault(key, set()).add(ticket)
        self.connections += 1
        return None, ticket

    def release(self, ticket):
        """The admitted connection of ``ticket`` ended."""
        if ticket is None:
            return
        tickets = self._open.get(ticket.key)
        if tickets is None or ticket not in tickets:
            return
        tickets.discard(ticket)
        self.connections -= 1
        if not tickets:
            del self._open[ticket.key]

    def open_from(self, ip):
        """Open connections of ``ip``'s client key (all listeners)."""
        return len(self._open.get(client_key(ip, self.ipv6_prefix), ()))

    def close_network(self, network, ban=None):
        """End every open session inside ``network`` (an ip_network); -> how many."""
        doomed = [ticket for key, tickets in list(self._open.items())
                  for ticket in list(tickets)
                  if ticket is not self.sparing and self._inside(ticket.ip, network)]
        closed = 0
        for ticket in doomed:
            self.release(ticket)
            if ticket.closer is not None:
                ticket.closer()
                closed += 1
        if doomed:
            events.emit("defence.sessions_closed", network=network.with_prefixlen,
                        count=closed)
        return closed

    def _inside(self, ip, network):
        if self.exempt.contains(ip):
            return False
        address = normalise(ip)
        return (address is not None and address.version == network.version
                and address in network)

    def _refused(self, ip, verdict, listener):
        key = client_key(ip, self.ipv6_prefix)
        now = self.clock.seconds()
        slot = self._refusals.get((key, verdict))
        if slot is not None and now - slot[0] < REFUSAL_EVENT_INTERVAL:
            slot[1] += 1
            return
        count = 1 if slot is None else slot[1] + 1
        if len(self._refusals) > 10000:
            self._refusals = {k: v for k, v in self._refusals.items()
                              if now - v[0] < REFUSAL_EVENT_INTERVAL}
        self._refusals[(key, verdict)] = [now, 0]
        events.emit("defence.refused", peer_ip=str(ip), network=key, listener=listener,
                    verdict=verdict, count=count)
