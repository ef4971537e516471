"""DNS for the inbound checks: the one shared resolver, bounded per message.

SPF, DKIM and DMARC of one message run on a worker thread (dnspython blocks:
TWISTED-TRAPS T24) through one ``Lookups``. It asks the server's shared
dnspython resolver (``[dns] nameservers``, its cache) and gives every query
at most ``[dns] timeout`` and never more than what is left of the message's
time budget: a sender's slow DNS costs the message a bounded time, after
which what is missing is a ``temperror``.

NXDOMAIN and "no such record" are an empty answer; a timeout, SERVFAIL or
any other failure to get an answer is ``TempDNSError``.

With an ``AnswerCache`` (``appliance.policy.answers``) every answer is kept
there for its TTL (negative ones for the SOA's, RFC 2308) and asked there
first; ``cache_only`` Lookups never ask DNS (``NotCached`` on a miss: they
are what the reactor thread may use). ``track()`` follows the answers one
computation reads: the smallest TTL among them, and whether a TXT record had
a macro, so that its result can be kept as long as they are valid.
"""

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from appliance.clock import default_clock
from appliance.policy.answers import NotCached, answer_ttl, negative_ttl


class TempDNSError(Exception):
    """No answer now (timeout, SERVFAIL, budget spent): a temperror, never a refusal."""


class Lookups:
    """DNS queries for one message's checks; use on one worker thread.

    ``budget``: seconds for all the queries of the message together, on
    ``clock`` (an IReactorTime; reading its time is safe from any thread);
    ``cache``: an AnswerCache (or None); ``cache_only``: answer from
    ``cache`` alone (see the module docstring).
    """

    def __init__(self, resolver, timeout, budget, clock=None, cache=None, cache_only=False):
        self.resolver = resolver
        self.timeout = timeout
        self.clock = default_clock(clock)
        self.deadline = self.clock.seconds() + budget
        self.cache = cache
        self.cache_only = cache_only
        self._tracking = None           # [smallest TTL, macro seen] while tracking

    def remaining(self):
        return self.deadline - self.clock.seconds()

    def track(self):
        """Start following the answers read (see ``tracked``)."""
        self._tracking = [float("inf"), False]

    def tracked(self):
        """``(smallest TTL, macro seen)`` of the answers read since ``track()``."""
        ttl, macro = self._tracking or (0.0, True)
        self._tracking = None
        return ttl, macro

    def _read(self, name, rdtype, rdatas, ttl):
        if self._tracking is not None:
            self._tracking[0] = min(self._tracking[0], ttl)
            if rdtype == "TXT" and any(b"%{" in s for rdata in rdatas for s in rdata.strings):
                self._tracking[1] = True
        return rdatas

    def query(self, name, rdtype):
        """The rdata of ``name``/``rdtype`` (CNAMEs followed); [] for none."""
        if self.cache is not None:
            key = (name.lower().rstrip("."), rdtype)
            entry = self.cache.get(key)
            if entry is not None:
                rdatas, expires = entry
                return self._read(name, rdtype, rdatas, expires - self.clock.seconds())
            if self.cache_only:
                raise NotCached(f"{name} {rdtype}")
        rdatas, ttl = self._ask(name, rdtype)
        if self.cache is not None:
            self.cache.put(key, (rdatas, self.clock.seconds() + ttl), ttl)
        return self._read(name, rdtype, rdatas, ttl)

    def _ask(self, name, rdtype):
        """``(rdatas, ttl)`` from the resolver (ttl 0: not to be kept)."""
        if self.cache_only:
            raise NotCached(f"{name} {rdtype}")
        left = self.remaining()
        if left <= 0:
            raise TempDNSError(f"time budget for the checks spent before {name}")
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return [], 3600.0   # not a valid DNS name: nothing can exist there
        try:
            answer = self.resolver.resolve(qname, rdtype, search=False,
                                           raise_on_no_answer=False,
                                           lifetime=min(self.timeout, left))
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            return [], min((negative_ttl(r) for r in responses.values()), default=0)
        except dns.resolver.NoAnswer as exc:
            return [], negative_ttl(exc.kwargs.get("response"))
        except dns.resolver.NoNameservers:
            raise TempDNSError(f"DNS server failure for {name} ({rdtype})") from None
        except dns.exception.Timeout:
            raise TempDNSError(f"DNS timeout for {name} ({rdtype})") from None
        except dns.exception.DNSException as exc:
            raise TempDNSError(f"DNS error for {name} ({rdtype}): "
                               f"{type(exc).__name__}") from None
        if answer.rrset is None:
            return [], negative_ttl(answer.response)
        return list(answer.rrset), answer_ttl(answer)

    def txt(self, name):
        """Each TXT record of ``name`` as one bytes string (its strings joined)."""
        return [b"".join(rdata.strings) for rdata in self.query(name, "TXT")]
