"""Bans: networks refused at connect on every listener, persisted.

``Bans.ban(network, duration=None, reason=..., rule=None)`` places a ban;
without a duration it escalates: ``ban_time`` for a first offence, doubled
for each repeat, up to ``ban_time_max``. Offences are remembered for
``ban_time_max`` after a ban ends. ``unban``, ``list`` and ``is_banned(ip)``
complete the API the auditor (#9) and the admin shell (#10) call.

Never banned: ``[limits] allow`` and ``[relay] trusted_networks``. Loopback is
not special (SPEC §4: other loopback addresses are ordinary clients; the
sample config puts 127.0.0.1 and ::1 in ``allow``). A ban asked for an exempt
address is not placed (event ``defence.ban.exempt``); a wider ban that
contains an exempt address never refuses that address.

Every ban, unban and expiry is an event. ``on_ban`` callbacks (the session
registry of ``appliance.defence.admission``) end the banned network's open
sessions.
"""

from appliance import events
from appliance.defence.network import ClientCounter, normalise, parse_network

BANS = "bans"               # state map: network -> ban record
OFFENCES = "offences"       # state map: network -> number of automatic bans

for _name, _description, _fields in (
    ("defence.ban", "a network was banned on every listener (duration in seconds; "
     "offence counts automatic bans of that network)",
     ("network", "reason", "rule", "duration", "until", "offence")),
    ("defence.unban", "a ban was lifted before its end", ("network", "reason")),
    ("defence.ban.expired", "a ban ran out", ("network", "reason", "rule")),
    ("defence.ban.exempt", "a ban was asked for an allow or trusted network and not placed",
     ("network", "reason", "rule")),
    ("defence.ban.remote", "a ban placed by another appliance arrived through the shared "
     "state ([state] backend = redis); its open sessions here are ended too",
     ("network", "reason", "rule", "until", "origin")),
    ("defence.ban.left", "the auditor's brute_force ban was left to the in-process AUTH "
     "failure count (identical passwords once, known logins half)", ("network", "rule")),
):
    events.register(_name, _description, _fields)


class Ban:
    """One ban as ``list()`` and ``is_banned()`` give it."""

    __slots__ = ("network", "reason", "rule", "since", "until", "duration", "offence")

    def __init__(self, network, record):
        self.network = network
        self.reason = record.get("reason", "")
        self.rule = record.get("rule")
        self.since = record.get("since")
        self.until = record.get("until")
        self.duration = record.get("duration")
        self.offence = record.get("offence", 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self):
        return f"<Ban {self.network} until {self.until} ({self.reason})>"


class Bans(ClientCounter):
    """The ban list over an ``IDefenceState`` (see the module doc).

    ``exempt``: a ``Networks`` of allow + trusted networks; ``limits``: the
    ``[limits]`` section (ban_time, ban_time_max, ipv6_prefix).
    """

    def __init__(self, state, clock, limits, exempt):
        super().__init__(state, limits, exempt, clock)
        self.ban_time = limits.ban_time
        self.ban_time_max = limits.ban_time_max
        self.on_ban = []            # callbacks(network: ip_network, ban: Ban)
        self._wide = {}             # network text -> ip_network, for bans wider than a key
        state.on_expire(BANS, self._expired)
        if hasattr(state, "on_remote"):     # shared state: bans of other appliances
            state.on_remote(BANS, self._remote)
        self.reindex()

    def reindex(self):
        """Rebuild the index of wide bans (after the state was loaded)."""
        self._wide = {}
        for field, _, _ in self.state.map_items(BANS):
            self._index(field)

    def _index(self, field):
        """Fields are written by ``_key`` (``address/prefix``, normalised):
        only the few wider than a client key are parsed (20,000 bans load
        in well under a second)."""
        address, _, prefix = field.partition("/")
        key_prefix = self.ipv6_prefix if ":" in address else 32
        if prefix.isdigit() and int(prefix) >= key_prefix:
            return
        try:
            self._wide[field] = parse_network(field)
        except ValueError:
            pass                # not ours: never matches a client

    def _key(self, network):
        """A network's field: a client address becomes its client key."""
        key_prefix = 32 if network.version == 4 else self.ipv6_prefix
        if network.prefixlen > key_prefix:      # an IPv6 host: its /ipv6_prefix
            network = network.supernet(new_prefix=key_prefix)
        return network, network.with_prefixlen

    def ban(self, network, duration=None, reason="", rule=None):
        """Ban ``network`` (text or ip_network; an address bans its client
        key); -> the ``Ban``, or None when the network is exempt.

        ``duration`` None: the escalating ban time; otherwise seconds (0 or
        less: until unbanned). A ban of a network already banned is
        replaced by whichever ends later.
        """
        network, field = self._key(parse_network(str(network)))
        if self.exempt.overlaps(network):
            events.emit("defence.ban.exempt", network=field, reason=reason, rule=rule)
            return None
        now = self.clock.seconds()
        current = self.state.map_get(BANS, field)
        if current is not None and duration is None:
            return Ban(field, current)      # banned already: not a new offence
        offence = 0
        if duration is None:
            previous = self.state.map_get(OFFENCES, field) or 0
            offence = previous + 1
            duration = min(self.ban_time * (2 ** min(previous, 64)), self.ban_time_max)
            self.state.map_put(OFFENCES, field, offence, ttl=duration + self.ban_time_max)
        until = None if duration <= 0 else now + duration
        if current is not None and (current.get("until") is None or
                                    (until is not None and current["until"] >= until)):
            return Ban(field, current)      # already banned at least as long
        record = {"reason": reason, "rule": rule, "since": now, "until": until,
                  "duration": None if until is None else duration, "offence": offence}
        self.state.map_put(BANS, field, record, ttl=None if until is None else duration)
        self._index(field)
        ban = Ban(field, record)
        events.emit("defence.ban", network=field, reason=reason, rule=rule,
                    duration=ban.duration, until=until, offence=offence)
        for callback in list(self.on_ban):
            callback(network, ban)
        return ban

    def unban(self, network, reason="admin"):
        """Lift the ban of exactly ``network``; True if there was one."""
        _, field = self._key(parse_network(str(network)))
        if not self.state.map_delete(BANS, field):
            return False
        self._wide.pop(field, None)
        events.emit("defence.unban", network=field, reason=reason)
        return True

    def list(self):
        """Every ban in force, soonest end first (bans without end last)."""
        bans = [Ban(field, record) for field, record, _ in self.state.map_items(BANS)]
        return sorted(bans, key=lambda b: (b.until is None, b.until or 0, b.network))

    def is_banned(self, ip):
        """The ``Ban`` refusing client ``ip`` (text), or None."""
        if normalise(ip) is None or self.exempt.contains(ip):
            return None
        field = self.key_of(ip)
        record = self.state.map_get(BANS, field)
        if record is not None:
            return Ban(field, record)
        if self._wide:
            address = normalise(ip)
            for wide, network in list(self._wide.items()):
                if address.version == network.version and address in network:
                    record = self.state.map_get(BANS, wide)
                    if record is not None:
                        return Ban(wide, record)
        return None

    def offences(self, network):
        """How many automatic bans ``network`` collected (remembered
        ``ban_time_max`` after the last one ended)."""
        _, field = self._key(parse_network(str(network)))
        return self.state.map_get(OFFENCES, field) or 0

    def _remote(self, field, record, origin):
        """Another appliance banned (record) or unbanned (None) ``field``:
        already in the state; index it and end the network's open sessions."""
        if record is None:
            self._wide.pop(field, None)
            return
        self._index(field)
        ban = Ban(field, record)
        events.emit("defence.ban.remote", network=field, reason=ban.reason, rule=ban.rule,
                    until=ban.until, origin=origin)
        try:
            network = parse_network(field)
        except ValueError:
            return
        for callback in list(self.on_ban):
            callback(network, ban)

    def _expired(self, field, record):
        self._wide.pop(field, None)
        events.emit("defence.ban.expired", network=field, reason=record.get("reason", ""),
                    rule=record.get("rule"))


class AuditorBans:
    """The ban service handed to the auditor (``app.bans``): ``ban(network,
    reason=, rule=)`` as ``Bans.ban``, except the auditor's ``brute_force``
    rule. AUTH failures are counted and banned in-process by
    ``appliance.defence.authfail.AuthGuard`` before the failing reply, with
    the same wrong password counted once and a known login's network
    weighed half; the auditor counts every ``auth.failure`` event alike and
    would ban a phone polling with a stale password. Its alert still goes
    out; the ban is left to the defences (event ``defence.ban.left``).
    Everything else (harvesting, relay probes, spraying, protocol abuse) is
    banned here as asked.
    """

    LEFT_TO_AUTHGUARD = frozenset({"brute_force"})

    def __init__(self, bans):
        self.bans = bans

    def ban(self, network, duration=None, reason="", rule=None):
        if rule in self.LEFT_TO_AUTHGUARD:
            events.emit("defence.ban.left", network=str(network), rule=rule)
            return None
        return self.bans.ban(network, duration=duration, reason=reason, rule=rule)

    def __getattr__(self, name):
        return getattr(self.bans, name)
