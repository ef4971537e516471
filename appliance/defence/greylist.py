"""Greylisting (SPEC §3 ``[checks] greylist*``, §4): a policy stage at RCPT,
after the recipient is known to be valid.

An unknown triplet (client network, sender, recipient) is answered 451 4.7.1;
the same triplet retried after ``greylist_delay`` and within
``greylist_window`` (both from its first attempt) passes, and stays passed
for ``greylist_keep`` after its last use. A client network that passed
``greylist_pass_after`` triplets is never greylisted again (until it has been
unused for ``greylist_keep``). Client networks are IPv4 /24 and IPv6
/``ipv6_prefix``.

Big senders retry from other hosts of their pool, often in other networks
(postgrey answers that with a hand-kept list of 166 entries). Here a retry
of (sender, recipient) after the delay from a network that has not been seen
before passes when the sender domain's SPF record authorises the new address
(``spf`` result ``pass``): the domain vouches for its pool, no list to keep.

Never greylisted: authenticated sessions, ``allow`` and ``trusted_networks``.
Every decision is an event. The three maps (``greylist``,
``greylist_networks``, ``greylist_pending``) are persistent state: a restart
does not greylist everyone again.
"""

from twisted.internet import defer

from appliance import events
from appliance.defence.network import greylist_key, normalise, parse_network

TRIPLETS = "greylist"
NETWORKS = "greylist_networks"
PENDING = "greylist_pending"

PASS = True
DEFER = False

for _name, _description, _fields in (
    ("defence.greylist.deferred", "greylisting answered 451 4.7.1 at RCPT "
     "(reason: new, early)", ("peer_ip", "network", "sender", "recipient", "reason")),
    ("defence.greylist.passed", "greylisting let a recipient through (how: retry, known, "
     "network, spf)", ("peer_ip", "network", "sender", "recipient", "how")),
):
    events.register(_name, _description, _fields)


def spf_checker(checks):
    """``spf(ip, sender)`` -> Deferred firing the SPF result of the MAIL FROM
    identity, using the inbound checks' resolver and thread pool
    (``appliance.policy.checks.InboundChecks``)."""
    from appliance.policy.lookup import Lookups
    from appliance.policy.spf_check import SPFResult, check_mailfrom

    def evaluate(ip, sender):
        lookups = Lookups(checks.resolver, checks.timeout, checks.budget, checks.clock)
        return check_mailfrom(lookups, ip, sender, SPFResult("helo", "", "none")).result

    def spf(ip, sender):
        return checks.run_in_thread(evaluate, ip, sender)
    return spf


class Greylist:
    """See the module doc. ``checks``: the ``[checks]`` section; ``limits``
    the ``[limits]`` one; ``exempt``: ``Networks`` of allow + trusted;
    ``spf``: ``spf_checker(...)`` or None (no SPF-vouched retries)."""

    def __init__(self, state, clock, checks, limits, exempt, spf=None):
        self.state = state
        self.clock = clock
        self.enabled = checks.greylist
        self.delay = checks.greylist_delay
        self.window = checks.greylist_window
        self.pass_after = checks.greylist_pass_after
        self.keep = checks.greylist_keep
        self.refresh = min(86400.0, self.keep / 10)
        self.ipv6_prefix = limits.ipv6_prefix
        self.exempt = exempt
        self.spf = spf

    def applies(self, ip, authenticated=False):
        return (self.enabled and not authenticated and normalise(ip) is not None
                and not self.exempt.contains(ip))

    def check(self, ip, sender, recipient, authenticated=False):
        """PASS (True) or DEFER (False) for RCPT ``recipient`` from client
        ``ip`` with MAIL FROM ``sender`` (canonical strings, "" for the null
        sender); a Deferred firing with one of them while SPF is asked."""
        if not self.applies(ip, authenticated):
            return PASS
        sender, recipient = sender.lower(), recipient.lower()
        network = greylist_key(ip, self.ipv6_prefix)
        now = self.clock.seconds()
        fields = dict(peer_ip=str(ip), network=network, sender=sender, recipient=recipient)
        known = self.state.map_get(NETWORKS, network)
        if known is not None and known >= self.pass_after:
            self._touch(NETWORKS, network, known, now)
            events.emit("defence.greylist.passed", how="network", **fields)
            return PASS
        triplet = f"{network}|{sender}|{recipient}"
        entry = self.state.map_get(TRIPLETS, triplet)
        if entry is not None:
            if entry.get("passed"):
                self._touch(TRIPLETS, triplet, entry, now)
                events.emit("defence.greylist.passed", how="known", **fields)
                return PASS
            age = now - entry["first"]
            if age < self.delay:
                events.emit("defence.greylist.deferred", reason="early", **fields)
                return DEFER
            return self._passed(triplet, network, "retry", fields)
        pending = self.state.map_get(PENDING, f"{sender}|{recipient}")
        if (pending is not None and self.spf is not None and sender
                and self.delay <= now - pending):
            d = defer.maybeDeferred(self.spf, str(normalise(ip)), sender)
            d.addErrback(lambda _: "temperror")
            d.addCallback(self._spf_answered, triplet, network, fields, now)
            return d
        return self._new(triplet, sender, recipient, fields, now)

    def _touch(self, name, field, value, now):
        """Keep a passed entry ``greylist_keep`` after its last use. Its
        expiry moves at most once per ``refresh`` (a day, or a tenth of
        greylist_keep): every message from a known sender must not rewrite
        the persisted greylist."""
        expires = self.state.map_expires(name, field)
        if expires is None or expires - now < self.keep - self.refresh:
            self.state.map_put(name, field, value, ttl=self.keep)

    def _spf_answered(self, result, triplet, network, fields, now):
        if result == "pass":
            return self._passed(triplet, network, "spf", fields)
        return self._new(triplet, fields["sender"], fields["recipient"], fields, now)

    def _new(self, triplet, sender, recipient, fields, now):
        self.state.map_put(TRIPLETS, triplet, {"first": now}, ttl=self.window)
        pending = f"{sender}|{recipient}"
        if self.state.map_get(PENDING, pending) is None:
            self.state.map_put(PENDING, pending, now, ttl=self.window)
        events.emit("defence.greylist.deferred", reason="new", **fields)
        return DEFER

    def _passed(self, triplet, network, how, fields):
        self.state.map_put(TRIPLETS, triplet, {"passed": True}, ttl=self.keep)
        self.state.map_delete(PENDING, f"{fields['sender']}|{fields['recipient']}")
        passes = (self.state.map_get(NETWORKS, network) or 0) + 1
        self.state.map_put(NETWORKS, network, passes, ttl=self.keep)
        events.emit("defence.greylist.passed", how=how, **fields)
        return PASS

    # -- what the admin shell's ``greylist`` commands call

    def network_key(self, text):
        """The greylist key of ``text``: an address becomes its client network
        (IPv4 /24, IPv6 /ipv6_prefix), a network is kept as given (host bits
        cleared); ValueError when it is neither."""
        if "/" not in str(text):
            if normalise(text) is None:
                raise ValueError(f"{text!r} is not an IP address or network")
            return greylist_key(text, self.ipv6_prefix)
        return parse_network(text).with_prefixlen

    def networks(self):
        """``[(network, passes, expires)]`` of the remembered client networks
        (``greylist_pass_after`` passes or more: never greylisted again)."""
        return sorted(self.state.map_items(NETWORKS))

    def pending(self):
        """``[(network, sender, recipient, first seen)]`` of the triplets that
        were deferred and not yet retried."""
        found = []
        for field, entry, _ in self.state.map_items(TRIPLETS):
            if isinstance(entry, dict) and not entry.get("passed"):
                network, _, rest = field.partition("|")
                sender, _, recipient = rest.rpartition("|")
                found.append((network, sender, recipient, entry.get("first")))
        return sorted(found)

    def allow(self, text):
        """The client network of ``text`` passes from now on (it counts as
        passed ``greylist_pass_after`` times); -> its key."""
        network = self.network_key(text)
        passes = max(self.state.map_get(NETWORKS, network) or 0, self.pass_after)
        self.state.map_put(NETWORKS, network, passes, ttl=self.keep)
        return network

    def forget(self, text):
        """Forget the client network of ``text`` and its triplets: it is
        greylisted like a new one; -> (key, whether anything was known)."""
        network = self.network_key(text)
        found = bool(self.state.map_delete(NETWORKS, network))
        for field, _, _ in self.state.map_items(TRIPLETS):
            if field.startswith(network + "|"):
                found = bool(self.state.map_delete(TRIPLETS, field)) or found
        return network, found
