"""SPF (RFC 7208) with pyspf, asking our DNS.

pyspf enforces the RFC 7208 §4.6.4 limits itself: 10 DNS-querying terms
(``MAX_LOOKUP``), 2 void lookups (``MAX_VOID_LOOKUPS``), 10 names per ``mx``
or ``ptr``; past them the result is ``permerror``.

pyspf resolves through its module-level ``DNSLookup`` function, its one
documented hook. We replace it once, at import, by a dispatcher: on a thread
that is running one of our checks it asks that check's ``Lookups`` (the
shared resolver, the message's time budget); anywhere else it calls pyspf's
own function, so nothing else in the process changes behaviour.

With an ``AnswerCache`` on the ``Lookups`` the result of a check is kept per
(identity, client IP, domain, HELO domain) for as long as every answer it
read (``appliance.policy.answers``); a cache-only ``Lookups`` takes results
from there alone.
"""

import contextlib
import re
import threading
from collections import namedtuple

import spf as pyspf

from appliance.address import dns_name
from appliance.policy.answers import NotCached
from appliance.policy.lookup import TempDNSError

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

SPFResult = namedtuple("SPFResult", "identity domain result")
SPFResult.__doc__ = """One SPF evaluation: identity "mailfrom" or "helo", the domain checked,
the RFC 7208 result (one of ``RESULTS``)."""

_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")

_current = threading.local()
_stock_lookup = pyspf.DNSLookup


def _rdata_for_pyspf(qtype, rdata):
    """One answer in the shape pyspf's own dnspython lookup gives."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange)
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return rdata.strings            # TXT, SPF: the record's strings, as bytes


def _dispatching_lookup(name, qtype, strict=True, timeout=30, *rest):
    lookups = getattr(_current, "lookups", None)
    if lookups is None:
        return _stock_lookup(name, qtype, strict, timeout, *rest)
    try:
        answers = lookups.query(name, qtype)
    except TempDNSError as exc:
        raise pyspf.TempError(f"DNS {exc}") from None
    return [((name, qtype), _rdata_for_pyspf(qtype, rdata)) for rdata in answers]


pyspf.DNSLookup = _dispatching_lookup


@contextlib.contextmanager
def _using(lookups):
    _current.lookups = lookups
    try:
        yield
    finally:
        _current.lookups = None


def _evaluate(lookups, ip, sender, helo):
    """One pyspf check_host(); a pyspf bug on hostile input is a temperror."""
    try:
        with _using(lookups):
            query = pyspf.query(i=ip, s=sender, h=helo, timeout=lookups.timeout,
                                querytime=0)
            result, _code, _explanation = query.check()
    except Exception:               # never let a library bug refuse or lose mail
        return "temperror"
    return result if result in RESULTS else "permerror"


def _kept_or_evaluated(lookups, key, ip, sender, helo):
    """The result kept under ``key`` in the lookups' cache, else ``_evaluate``'s
    (kept when it may be: see the module docstring)."""
    cache = lookups.cache
    if cache is None:
        return _evaluate(lookups, ip, sender, helo)
    result = cache.get(key)
    if result is not None:
        return result
    if lookups.cache_only:
        raise NotCached(f"SPF {key}")
    lookups.track()
    result = _evaluate(lookups, ip, sender, helo)
    ttl, macro = lookups.tracked()
    if result != "temperror" and not macro:
        cache.put(key, result, ttl)
    return result


def check_helo(lookups, ip, helo):
    """The HELO identity (RFC 7208 §2.3); "none" for an address literal or a
    name that is not a domain."""
    domain = dns_name(helo) if helo and not helo.startswith("[") else None
    if domain is None:
        return SPFResult("helo", helo, "none")
    return SPFResult("helo", domain,
                     _kept_or_evaluated(lookups, ("spf-helo", ip, domain), ip, "", domain))


def check_mailfrom(lookups, ip, sender, helo_result):
    """The MAIL FROM identity (RFC 7208 §2.4); for the null sender it is the
    HELO identity's result."""
    if not sender:
        return SPFResult("mailfrom", helo_result.domain, helo_result.result)
    local, _, domain = sender.rpartition("@")
    ascii_domain = dns_name(domain)
    if ascii_domain is None:
        return SPFResult("mailfrom", domain, "none")
    # The local part only feeds %{l} macros; pyspf splits at the first "@".
    local = _NOT_ATEXT.sub("_", local) or "postmaster"
    key = ("spf-mailfrom", ip, ascii_domain, helo_result.domain)
    return SPFResult("mailfrom", ascii_domain,
                     _kept_or_evaluated(lookups, key, ip, f"{local}@{ascii_domain}",
                                        helo_result.domain))
