"""What the inbound checks learnt from DNS, kept for as long as DNS says.

One ``AnswerCache`` per server, shared by the checks of every message (any
thread: a lock guards it). It holds two kinds of entries, each until the
smallest TTL it was built from:

- answers: ``(name, type) -> [rdata]``, positive ones for their TTL and
  negative ones (NXDOMAIN, no such record) for the TTL of the zone's SOA
  (RFC 2308 §5: min(SOA TTL, SOA MINIMUM)); a negative answer without an
  SOA, a timeout or a server failure is not kept;
- results: an SPF result per ``(identity, client IP, domain, HELO domain)``,
  until the first of the answers it was computed from expires. A result that
  read a record with a macro (``%{``: it may depend on the local part) or
  that is a ``temperror`` is not kept.

dnspython's resolver has a cache too, but asking it costs a name parse and a
resolution object per query; this is one dict look-up. Both are bounded:
past ``MAX_ENTRIES`` the oldest entries go.

``NotCached`` is what a cache-only ``Lookups`` raises on a miss: the checks
then run again on their thread, where DNS may be asked.
"""

import threading
import time

from appliance.clock import default_clock

MAX_ENTRIES = 20000
MAX_TTL = 86400.0           # no answer is kept longer than a day, whatever its TTL


class NotCached(Exception):
    """A cache-only look-up missed: ask DNS (off the reactor)."""


class AnswerCache:
    """See the module docstring; ``clock``: an IReactorTime (the reactor by default)."""

    def __init__(self, max_entries=MAX_ENTRIES, clock=None):
        self.max_entries = max_entries
        self.clock = default_clock(clock)
        self._entries = {}
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    def get(self, key):
        """The value kept under ``key``, or None (missing or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self.clock.seconds():
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            return None
        return value

    def put(self, key, value, ttl):
        """Keep ``value`` for ``ttl`` seconds (nothing for ttl <= 0)."""
        if ttl <= 0:
            return
        expires = self.clock.seconds() + min(ttl, MAX_TTL)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = (value, expires)
            if len(self._entries) > self.max_entries:
                self._evict()

    def _evict(self):
        """Drop the expired entries, then the oldest down to 90 % of the bound."""
        now = self.clock.seconds()
        for key in [k for k, (_v, expires) in self._entries.items() if expires <= now]:
            del self._entries[key]
        excess = len(self._entries) - int(self.max_entries * 0.9)
        if excess > 0:
            for key in list(self._entries)[:excess]:
                del self._entries[key]

    def clear(self):
        with self._lock:
            self._entries.clear()


def answer_ttl(answer, now=None):
    """Seconds dnspython gives ``answer`` (a resolver Answer) to live."""
    now = time.time() if now is None else now
    return answer.expiration - now


def negative_ttl(response):
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM); 0
    without an SOA in the authority section (then it is not kept)."""
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == 6 and len(rrset):        # SOA
            return min(rrset.ttl, rrset[0].minimum)
    return 0
