"""DNS for the inbound checks: the one shared resolver, bounded per message.

SPF, DKIM and DMARC of one message run on a worker thread (dnspython blocks:
TWISTED-TRAPS T24) through one ``Lookups``. It asks the server's shared
dnspython resolver (``[dns] nameservers``, its cache) and gives every query
at most ``[dns] timeout`` and never more than what is left of the message's
time budget: a sender's slow DNS costs the message a bounded time, after
which what is missing is a ``temperror``.

NXDOMAIN and "no such record" are an empty answer; a timeout, SERVFAIL or
any other failure to get an answer is ``TempDNSError``.
"""

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from appliance.clock import default_clock


class TempDNSError(Exception):
    """No answer now (timeout, SERVFAIL, budget spent): a temperror, never a refusal."""


class Lookups:
    """DNS queries for one message's checks; use on one worker thread.

    ``budget``: seconds for all the queries of the message together, on
    ``clock`` (an IReactorTime; reading its time is safe from any thread).
    """

    def __init__(self, resolver, timeout, budget, clock=None):
        self.resolver = resolver
        self.timeout = timeout
        self.clock = default_clock(clock)
        self.deadline = self.clock.seconds() + budget

    def remaining(self):
        return self.deadline - self.clock.seconds()

    def query(self, name, rdtype):
        """The rdata of ``name``/``rdtype`` (CNAMEs followed); [] for none."""
        left = self.remaining()
        if left <= 0:
            raise TempDNSError(f"time budget for the checks spent before {name}")
        try:
            qname = dns.name.from_text(name.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return []           # not a valid DNS name: nothing can exist there
        try:
            answer = self.resolver.resolve(qname, rdtype, search=False,
                                           raise_on_no_answer=False,
                                           lifetime=min(self.timeout, left))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers:
            raise TempDNSError(f"DNS server failure for {name} ({rdtype})") from None
        except dns.exception.Timeout:
            raise TempDNSError(f"DNS timeout for {name} ({rdtype})") from None
        except dns.exception.DNSException as exc:
            raise TempDNSError(f"DNS error for {name} ({rdtype}): "
                               f"{type(exc).__name__}") from None
        return list(answer.rrset) if answer.rrset is not None else []

    def txt(self, name):
        """Each TXT record of ``name`` as one bytes string (its strings joined)."""
        return [b"".join(rdata.strings) for rdata in self.query(name, "TXT")]
