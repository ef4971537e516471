"""The auditor's rules: one engine over typed event records, live or replayed.

``Engine.feed(record)`` takes one event record as ``[log] events`` holds it
(``{"ts": ..., "event": ..., fields...}``; live, ``events.as_record`` of the
published event) and calls ``on_finding(Finding)`` when a rule's threshold is
crossed. Time is the records' own ``ts``: the same records give the same
findings whether they arrive from the publisher or from a log file, at any
speed. Nothing here touches a clock, a file or the network.

Rules (SPEC §4 "The auditor"); a *network* is an IPv4 address or an IPv6
``/[limits] ipv6_prefix``; every count is over the sliding window (records
with ``ts`` in ``(now - window, now]``):

=================  ===========================================  =================  ======
rule               counts                                       threshold          action
=================  ===========================================  =================  ======
brute_force        auth.failure, admin.login_failed per network  [limits]           ban
                   (window: [limits] auth_failure_window)       auth_failures_
                                                                before_ban
spraying           distinct accounts failing auth per network   spray_threshold    ban
account_attack     auth failures for one account, from at       account_attack_    none
                   least two networks                           threshold
harvesting         smtp.rcpt.rejected 5.1.1 (unknown user)      harvest_threshold  ban
                   per network
relay_probe        smtp.rcpt.rejected 5.7.1 (relay denied)      relay_probe_       ban
                   per network                                  threshold
protocol_abuse     smtp.protocol_error, overlong IMAP/POP3      protocol_error_    ban
                   lines, input pipelined after STARTTLS/STLS   threshold
                   per network
admin_ssh          admin.login_failed per network               1                  none
send_spike         smtp.message.accepted of one authenticated   send_spike         hold
                   account
server_trouble     spool.error, spool.corrupt, spool.space_low, 1 per kind         none
                   spool.writer.lost, ldap.unavailable,
                   dkim.sign_failed, queue.stale,
                   state.redis_down
=================  ===========================================  =================  ======

After a finding, the rule forgets what it counted for that key and stays
quiet about it for one window: at most one alert per rule, key and window,
whatever the attacker keeps doing. A ban rule's action is ``none`` for a
network in ``[limits] allow`` or ``[relay] trusted_networks`` (never banned).
Memory is bounded: a key holds at most its threshold of timestamps, and keys
idle for a window are dropped.
"""

import collections
import dataclasses
import functools
import ipaddress

BAN, HOLD, NONE = "ban", "hold", "none"

RULES = ("brute_force", "spraying", "account_attack", "harvesting", "relay_probe",
         "protocol_abuse", "admin_ssh", "send_spike", "server_trouble")

ADMIN_LOGIN_FAILED = "admin.login_failed"     # the admin shell's event (peer_ip, user, key_fingerprint)
AUTH_FAILURES = ("auth.failure", ADMIN_LOGIN_FAILED)
UNKNOWN_USER = "5.1.1"
RELAY_DENIED = "5.7.1"
PROTOCOL_LIMITS = {"imap.limit": {"line_length", "command_size"},
                   "pop3.limit": {"line_flood"}}
PIPELINED_AFTER_TLS = ("smtp.starttls.discarded", "imap.starttls.discarded",
                       "pop3.stls.discarded")
TROUBLE = ("spool.error", "spool.corrupt", "spool.space_low", "spool.writer.lost",
           "ldap.unavailable", "dkim.sign_failed", "queue.stale", "state.redis_down")
MAX_KEYS = 200_000      # per rule; beyond it the oldest keys are dropped (at a purge)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The numbers the rules use (``from_config``: SPEC §3 [audit] and [limits])."""

    window: float = 900.0
    auth_failures: int = 5
    auth_failure_window: float = 900.0
    spray_threshold: int = 10
    account_attack_threshold: int = 20
    harvest_threshold: int = 20
    relay_probe_threshold: int = 3
    protocol_error_threshold: int = 30
    send_spike: int = 200
    ipv6_prefix: int = 64
    never_banned: tuple = ()        # ip_network objects: [limits] allow + [relay] trusted

    @classmethod
    def from_config(cls, cfg):
        a, limits = cfg.audit, cfg.limits
        return cls(window=a.window, auth_failures=limits.auth_failures_before_ban,
                   auth_failure_window=limits.auth_failure_window,
                   spray_threshold=a.spray_threshold,
                   account_attack_threshold=a.account_attack_threshold,
                   harvest_threshold=a.harvest_threshold,
                   relay_probe_threshold=a.relay_probe_threshold,
                   protocol_error_threshold=a.protocol_error_threshold,
                   send_spike=a.send_spike, ipv6_prefix=limits.ipv6_prefix,
                   never_banned=tuple(limits.allow) + tuple(cfg.relay.trusted_networks))


@dataclasses.dataclass(frozen=True)
class Finding:
    """One alert: ``peer_ip`` is the network ("192.0.2.7", "2001:db8:1:2::/64")
    or "", ``account`` the account or "", ``ts`` the time of the record that
    crossed the threshold, ``window`` the rule's window in seconds."""

    ts: float
    rule: str
    peer_ip: str
    account: str
    count: int
    window: float
    action: str
    detail: str

    def to_json(self):
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=65536)
def _network(peer_ip, ipv6_prefix):
    """(key text, ip_network) for a peer address, or None if it is not an IP."""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except (ValueError, TypeError):
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return str(ip), ipaddress.ip_network(ip)
    net = ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False)
    return str(net), net


class _Counts:
    """Per key: the timestamps within the window (at most ``threshold``), and
    when a key that fired may count again."""

    __slots__ = ("window", "threshold", "hits", "quiet")

    def __init__(self, window, threshold):
        self.window = window
        self.threshold = threshold
        self.hits = {}          # key -> deque of ts (or dict item -> ts for distinct counts)
        self.quiet = {}         # key -> ts until which the key is not counted

    def _quiet(self, key, ts):
        """Is ``key`` still quiet after firing? (Its quiet time ends at ``ts``.)"""
        until = self.quiet.get(key)
        if until is None:
            return False
        if ts < until:
            return True
        del self.quiet[key]
        return False

    def add(self, key, ts):
        """Count one hit; the count when it reaches the threshold, else 0."""
        if self._quiet(key, ts):
            return 0
        q = self.hits.get(key)
        if q is None:
            q = self.hits[key] = collections.deque()
        q.append(ts)
        limit = ts - self.window
        while q[0] <= limit:
            q.popleft()
        if len(q) >= self.threshold:
            return self.fired(key, ts, len(q))
        return 0

    def add_distinct(self, key, item, ts):
        """Count ``item`` once per key; the number of distinct items at the threshold."""
        if self._quiet(key, ts):
            return 0
        items = self.hits.get(key)
        if items is None:
            items = self.hits[key] = {}
        items.pop(item, None)
        items[item] = ts            # insertion order = age order
        if len(items) >= self.threshold:
            limit = ts - self.window
            for old in [i for i, t in items.items() if t <= limit]:
                del items[old]
            if len(items) >= self.threshold:
                return self.fired(key, ts, len(items))
        return 0

    def fired(self, key, ts, count):
        del self.hits[key]
        self.quiet[key] = ts + self.window
        return count

    def purge(self, now):
        """Drop keys with nothing left in the window, and ended quiet times."""
        limit = now - self.window
        for key in [k for k, q in self.hits.items() if _newest(q) <= limit]:
            del self.hits[key]
        for key in [k for k, until in self.quiet.items() if until <= now]:
            del self.quiet[key]
        while len(self.hits) > MAX_KEYS:
            del self.hits[next(iter(self.hits))]


def _newest(hits):
    if not hits:
        return float("-inf")
    if isinstance(hits, dict):
        return max(hits.values())
    last = hits[-1]
    return last[0] if isinstance(last, tuple) else last


class Engine:
    """Feeds records through every rule; see the module docstring."""

    def __init__(self, settings, on_finding):
        self.settings = s = settings
        self.on_finding = on_finding
        w = s.window
        self.brute = _Counts(s.auth_failure_window, s.auth_failures)
        self.spray = _Counts(w, s.spray_threshold)
        self.attack = _Counts(w, s.account_attack_threshold)
        self.harvest = _Counts(w, s.harvest_threshold)
        self.relay = _Counts(w, s.relay_probe_threshold)
        self.abuse = _Counts(w, s.protocol_error_threshold)
        self.admin = _Counts(w, 1)
        self.spike = _Counts(w, s.send_spike)
        self.trouble = _Counts(w, 1)
        self._all = (self.brute, self.spray, self.attack, self.harvest, self.relay,
                     self.abuse, self.admin, self.spike, self.trouble)
        self._next_purge = None
        self.records = 0
        handlers = {
            "auth.failure": self._auth_failure,
            ADMIN_LOGIN_FAILED: self._admin_failure,
            "smtp.rcpt.rejected": self._rcpt_rejected,
            "smtp.protocol_error": self._protocol_error,
            "imap.limit": self._limit,
            "pop3.limit": self._limit,
            "smtp.message.accepted": self._accepted,
        }
        for name in PIPELINED_AFTER_TLS:
            handlers[name] = self._protocol_error
        for name in TROUBLE:
            handlers[name] = self._trouble
        self.handlers = handlers

    @property
    def events(self):
        """The event names any rule reads (a replay may skip all others unparsed)."""
        return frozenset(self.handlers)

    def feed(self, record):
        handler = self.handlers.get(record.get("event"))
        if handler is None:
            return
        ts = record.get("ts")
        if not isinstance(ts, (int, float)):
            return
        self.records += 1
        if self._next_purge is None or ts >= self._next_purge:
            self._purge(ts)
        handler(record, ts)

    def _purge(self, now):
        for counts in self._all:
            counts.purge(now)
        self._next_purge = now + min(self.settings.window, self.settings.auth_failure_window)

    # -- helpers

    def _net(self, record):
        return _network(record.get("peer_ip"), self.settings.ipv6_prefix)

    def _ban_or_none(self, net):
        return NONE if any(net.subnet_of(n) for n in self.settings.never_banned
                           if n.version == net.version) else BAN

    def _find(self, ts, rule, count, window, action, detail, peer_ip="", account=""):
        self.on_finding(Finding(ts=ts, rule=rule, peer_ip=peer_ip, account=account,
                                count=count, window=window, action=action, detail=detail))

    def _count_client(self, record, ts, counts, rule, what):
        """Count ``record``'s client in ``counts``; at the threshold, a
        finding ``rule`` ("<count> <what>") that bans the client unless it is
        never_banned. -> the client's (key, network), None if it has none."""
        found = self._net(record)
        if found is None:
            return None
        key, net = found
        count = counts.add(key, ts)
        if count:
            self._find(ts, rule, count, counts.window, self._ban_or_none(net),
                       f"{count} {what}", peer_ip=key)
        return found

    # -- rules

    def _auth_failure(self, record, ts):
        found = self._count_client(record, ts, self.brute, "brute_force",
                                   "authentication failures")
        if found is None:
            return
        key, net = found
        account = str(record.get("account") or "")[:256]
        if account:
            count = self.spray.add_distinct(key, account, ts)
            if count:
                self._find(ts, "spraying", count, self.spray.window, self._ban_or_none(net),
                           f"{count} accounts failed authentication", peer_ip=key)
            self._account_attack(account, key, ts)

    def _account_attack(self, account, network, ts):
        """The last ``threshold`` failures for ``account`` within the window,
        from at least two networks (one network alone is brute force's)."""
        counts = self.attack
        if account in counts.quiet:
            if ts < counts.quiet[account]:
                return
            del counts.quiet[account]
        q = counts.hits.get(account)
        if q is None:
            q = counts.hits[account] = collections.deque()
        q.append((ts, network))
        limit = ts - counts.window
        while q[0][0] <= limit:
            q.popleft()
        if len(q) < counts.threshold:
            return
        networks = {n for _, n in q}
        if len(networks) < 2:
            q.popleft()
            return
        count = counts.fired(account, ts, len(q))
        self._find(ts, "account_attack", count, counts.window, NONE,
                   f"{count} authentication failures from {len(networks)} networks",
                   account=account)

    def _admin_failure(self, record, ts):
        self._auth_failure(record, ts)
        found = self._net(record)
        if found is None:
            return
        key, _ = found
        if self.admin.add(key, ts):
            user = str(record.get("user") or "")[:64]
            self._find(ts, "admin_ssh", 1, self.admin.window, NONE,
                       f"admin SSH login failed (user {user!r})", peer_ip=key)

    def _rcpt_rejected(self, record, ts):
        status = record.get("status")
        if status == UNKNOWN_USER:
            counts, rule, what = self.harvest, "harvesting", "unknown recipients"
        elif status == RELAY_DENIED:
            counts, rule, what = self.relay, "relay_probe", "relay attempts refused"
        else:
            return
        self._count_client(record, ts, counts, rule, what)

    def _limit(self, record, ts):
        if record.get("kind") in PROTOCOL_LIMITS[record["event"]]:
            self._protocol_error(record, ts)

    def _protocol_error(self, record, ts):
        what = f"protocol errors (last: {record['event']} {record.get('kind', '')})"
        self._count_client(record, ts, self.abuse, "protocol_abuse", what.replace(" )", ")"))

    def _accepted(self, record, ts):
        account = record.get("account")
        if not account or not isinstance(account, str):
            return
        count = self.spike.add(account, ts)
        if count:
            self._find(ts, "send_spike", count, self.spike.window, HOLD,
                       f"{count} messages sent", account=account)

    def _trouble(self, record, ts):
        name = record["event"]
        if self.trouble.add(name, ts):
            why = record.get("error") or record.get("reason") or record.get("status") or ""
            detail = f"{name}: {why}" if why != "" else name
            self._find(ts, "server_trouble", 1, self.trouble.window, NONE,
                       str(detail)[:300])
