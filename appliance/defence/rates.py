"""Rate limits over sliding windows (``IDefenceState.window_hit``).

- ``connection(ip)``: ``connections_per_minute_per_ip`` new connections in
  the last minute (all listeners together); past it 421 4.7.0 at connect;
- ``message_from_ip(ip)``: ``messages_per_hour_per_ip`` MAIL transactions
  of unauthenticated senders on the MX port; past it 451 4.7.1 at MAIL;
- ``message_from_user(user)``: ``messages_per_hour_per_user`` MAIL
  transactions of an authenticated user (submission, and AUTH wherever);
  past it 451 4.7.1 at MAIL.

A MAIL that is allowed counts (a transaction started; RSET does not give it
back): the client is told before it sends the body, and nothing accepted is
ever dropped because of a limit. A refused attempt does not count. Networks
in ``allow`` and ``trusted_networks`` are never limited. Every refusal is a
``defence.limit`` event (registered in ``appliance.defence.authfail``).
"""

from appliance import events
from appliance.defence import authfail  # noqa: F401  (registers defence.limit)
from appliance.defence.network import ClientCounter

MINUTE = 60.0
HOUR = 3600.0


class Rates(ClientCounter):
    """The per-minute and per-hour limits of ``[limits]``."""

    def _hit(self, kind, key, window, limit):
        allowed, count = self.state.window_hit(f"{kind}:{key}", window, limit)
        if not allowed:
            events.emit("defence.limit", kind=kind, key=key, count=count, limit=limit)
        return allowed

    def connection(self, ip):
        """Count a new connection of ``ip``; False when over the limit."""
        if self.exempt.contains(ip):
            return True
        return self._hit("connections_per_minute_per_ip", self.key_of(ip),
                         MINUTE, self.limits.connections_per_minute_per_ip)

    def message_from_ip(self, ip):
        """Count a MAIL of an unauthenticated client; False when over."""
        if self.exempt.contains(ip):
            return True
        return self._hit("messages_per_hour_per_ip", self.key_of(ip),
                         HOUR, self.limits.messages_per_hour_per_ip)

    def message_from_user(self, user, ip=None):
        """Count a MAIL of authenticated ``user``; False when over. A
        client in ``allow`` (local webmail) is not limited."""
        if ip is not None and self.exempt.contains(ip):
            return True
        return self._hit("messages_per_hour_per_user", user.lower(), HOUR,
                         self.limits.messages_per_hour_per_user)

    # -- what the admin shell's ``limits`` shows (counting nothing)

    def _count(self, kind, key, window):
        return self.state.window_count(f"{kind}:{key}", window)

    def counts_of_ip(self, ip):
        """``{kind: (count now, limit)}`` of client ``ip``'s network."""
        key = self.key_of(ip)
        return {kind: (self._count(kind, key, window), getattr(self.limits, kind))
                for kind, window in (("connections_per_minute_per_ip", MINUTE),
                                     ("messages_per_hour_per_ip", HOUR))}

    def counts_of_user(self, user):
        """``{kind: (count now, limit)}`` of authenticated ``user``."""
        kind = "messages_per_hour_per_user"
        return {kind: (self._count(kind, user.lower(), HOUR),
                       self.limits.messages_per_hour_per_user)}
