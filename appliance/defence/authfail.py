"""AUTH failures per client network, the ban they lead to, and accounts
attacked from many networks.

``AuthGuard.failure(ip, account, fingerprint)`` counts one failure of client
``ip`` within ``[limits] auth_failure_window``; at
``auth_failures_before_ban`` the network is banned (``Bans.ban``, escalating)
**before** the caller answers the failing attempt, so the answer can be the
last one. ``success(ip, account)`` records a good login.

The weights (decided here, SPEC §4 leaves them to us):

- The same wrong credential again counts once. ``fingerprint(account,
  secret)`` is an HMAC-SHA256 under a key made at process start and kept in
  memory only; neither the secret nor the HMAC is stored or logged. A phone
  polling with a stale password fails ~288 times a day with one fingerprint:
  one failure, its owner's network is never banned for it.
- A failure for an account that logged in successfully from the same
  network within ``KNOWN_LOGIN_DAYS`` (7) weighs half: an office behind one
  NAT after a password change needs twice the failures, a password
  guesser that never got in is not helped. Known logins are persisted
  (state map ``logins``).
- A success clears the network's count when every failure counted in the
  window was for that account (a user who mistyped, then got it right). A
  network spraying several accounts keeps its count even if one login works.
- ``allow`` and ``trusted_networks`` are never counted or banned.
- An account failing from ``account_attack_networks`` distinct networks in
  the window is an event (``defence.account_attacked``, once per window),
  never a lockout: the owner can still log in.
"""


from appliance import events
from appliance.defence.network import ClientCounter, normalise

KNOWN_LOGIN_DAYS = 7
KNOWN_LOGIN_WEIGHT = 0.5
LOGIN_REFRESH = 86400       # seconds: how often a known login's 7 days restart
ACCOUNT_ATTACK_NETWORKS = 10
LOGINS = "logins"           # state map: "network|account" -> last success time


for _name, _description, _fields in (
    ("defence.limit", "a limit was hit (kind: connections_per_ip, "
     "connections_per_minute_per_ip, messages_per_hour_per_ip, messages_per_hour_per_user, "
     "auth_failures, junk_commands); key is the client network or the user",
     ("kind", "key", "count", "limit")),
    ("defence.account_attacked", "one account failed AUTH from many networks within "
     "auth_failure_window: an alert, never a lockout", ("account", "networks", "window")),
):
    events.register(_name, _description, _fields)


class AuthGuard(ClientCounter):
    """See the module doc. ``bans``: ``appliance.defence.bans.Bans``;
    ``exempt``: ``Networks`` of allow + trusted networks."""

    def __init__(self, state, clock, bans, limits, exempt,
                 account_attack_networks=ACCOUNT_ATTACK_NETWORKS):
        super().__init__(state, limits, exempt, clock)
        self.bans = bans
        self.limit = limits.auth_failures_before_ban
        self.window = limits.auth_failure_window
        self.account_attack_networks = account_attack_networks

    def failure(self, ip, account="", fingerprint=None):
        """Count a failed AUTH from ``ip`` for ``account`` (the claimed
        identity; may be empty); ``fingerprint`` from ``fingerprint()``, None
        when the attempt carried no secret (malformed). -> the ``Ban``
        placed by this failure, or None."""
        account = (account or "").lower()
        key = self.key_of(ip)
        if account:
            self._watch_account(account, key)
        if normalise(ip) is None or self.exempt.contains(ip):
            return None
        if fingerprint is not None:
            seen = f"auth.seen:{key}"
            if fingerprint in self.state.set_members(seen):
                return None         # the same wrong secret again
            self.state.set_add(seen, fingerprint, ttl=self.window)
        if account:
            self.state.set_add(f"auth.accounts:{key}", account, ttl=self.window)
        known = account and self.state.map_get(LOGINS, f"{key}|{account}") is not None
        weight = KNOWN_LOGIN_WEIGHT if known else 1
        count = self.state.window_add(f"auth.fail:{key}", self.window, weight)
        if count < self.limit:
            return None
        events.emit("defence.limit", kind="auth_failures", key=key, count=count,
                    limit=self.limit)
        self._clear(key)
        return self.bans.ban(key, reason=f"{self.limit} AUTH failures",
                             rule="auth_failures_before_ban")

    def success(self, ip, account):
        """A good login from ``ip`` for ``account``."""
        account = (account or "").lower()
        key = self.key_of(ip)
        if normalise(ip) is None:
            return
        now = self.clock.seconds()
        field = f"{key}|{account}"
        last = self.state.map_get(LOGINS, field)
        if last is None or now - last >= LOGIN_REFRESH:
            # At most once a day per network and account: logins must not
            # rewrite the persisted map each time.
            self.state.map_put(LOGINS, field, round(now), ttl=KNOWN_LOGIN_DAYS * 86400)
        if self.state.set_members(f"auth.accounts:{key}") <= {account}:
            self._clear(key)

    def failures(self, ip):
        """The weighted failures of ``ip``'s network in the window."""
        return self.state.window_count(f"auth.fail:{self.key_of(ip)}",
                                       self.window)

    def _clear(self, key):
        self.state.window_clear(f"auth.fail:{key}")
        for name in (f"auth.seen:{key}", f"auth.accounts:{key}"):
            for member in self.state.set_members(name):
                self.state.set_discard(name, member)

    def _watch_account(self, account, key):
        size = self.state.set_add(f"auth.networks:{account}", key, ttl=self.window)
        if size >= self.account_attack_networks:
            flag = f"auth.attacked:{account}"
            if self.state.get(flag) is None:
                self.state.put(flag, True, ttl=self.window)
                events.emit("defence.account_attacked", account=account, networks=size,
                            window=self.window)
