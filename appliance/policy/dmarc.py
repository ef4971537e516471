"""DMARC (RFC 7489): the From domain's policy, alignment, the disposition.

- Policy discovery (§6.6.3): the TXT record at ``_dmarc.<From domain>``,
  else at ``_dmarc.<organizational domain>`` (publicsuffixlist), where the
  ``sp`` policy applies to the subdomain. Zero or several ``v=DMARC1``
  records at a name: no policy there.
- Alignment (§3.1): relaxed (same organizational domain, the default) or
  strict (the same domain), per ``adkim`` / ``aspf``.
- pass: an aligned SPF pass or an aligned DKIM pass. Otherwise, when an
  aligned check could not be done now (a DNS failure), ``temperror``; else
  ``fail``. A failed record lookup is ``temperror`` too: DNS trouble never
  refuses a message.
- ``pct`` (§6.6.4): a failing message outside the sample gets the next
  milder policy (reject -> quarantine, quarantine -> none); ``random()`` is
  injected so tests choose the draw.
"""

import functools
import re
import threading
from collections import namedtuple
from dataclasses import dataclass

from appliance.policy.lookup import TempDNSError

POLICIES = ("none", "quarantine", "reject")
_SEVERITY = {name: rank for rank, name in enumerate(POLICIES)}
_VERSION = re.compile(rb"v[ \t]*=[ \t]*DMARC1[ \t]*(;|\Z)")

DMARCResult = namedtuple("DMARCResult", "domain result policy disposition reason")
DMARCResult.__doc__ = """The verdict for one From domain: result (pass, fail, none,
temperror, permerror), the policy that applies (p or sp, "" without a record),
the disposition after pct (none, quarantine, reject) and our reason."""

_psl = None
_psl_lock = threading.Lock()


def _public_suffixes():
    """The Public Suffix List, parsed once (on first use, on a worker thread)."""
    global _psl
    with _psl_lock:
        if _psl is None:
            try:
                from publicsuffixlist import PublicSuffixList
            except ImportError:  # Debian 12: the publicsuffix package's list
                from appliance.policy.psl import PublicSuffixList
            _psl = PublicSuffixList()
        return _psl


def suffixes_loaded():
    """Whether the Public Suffix List is parsed already (the reactor may not parse it)."""
    return _psl is not None


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain):
    """RFC 7489 §3.2: the registrable domain of ``domain`` (itself if none)."""
    domain = domain.rstrip(".").lower()
    return _public_suffixes().privatesuffix(domain) or domain


def aligned(domain, from_domain, mode):
    """Identifier alignment of ``domain`` with the From domain (``mode`` r/s)."""
    if not domain or not from_domain:
        return False
    domain, from_domain = domain.rstrip(".").lower(), from_domain.rstrip(".").lower()
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


@dataclass(frozen=True)
class Record:
    """The tags of a DMARC record that decide the disposition."""

    policy: str
    subdomain_policy: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


def parse_record(text):
    """A ``Record`` from TXT bytes, or None when it is not a usable DMARC record."""
    try:
        text = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags = {}
    for index, part in enumerate(text.split(";")):
        name, equals, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if index == 0 and (name != "v" or value != "DMARC1"):
            return None         # §6.6.3: records not starting with v=DMARC1 are ignored
        if equals and name not in tags:
            tags[name] = value
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        if not tags.get("rua"):
            return None
        policy = "none"         # §6.6.3: a bad p= with rua= acts as p=none
    subdomain_policy = tags.get("sp", "").lower()
    return Record(policy=policy,
                  subdomain_policy=subdomain_policy if subdomain_policy in POLICIES else policy,
                  pct=_pct(tags.get("pct", "100")),
                  adkim="s" if tags.get("adkim", "").lower() == "s" else "r",
                  aspf="s" if tags.get("aspf", "").lower() == "s" else "r")


def _pct(value):
    return int(value) if value.isdigit() and int(value) <= 100 else 100


def _record_at(lookups, domain):
    candidates = [txt for txt in lookups.txt("_dmarc." + domain) if _VERSION.match(txt)]
    return parse_record(candidates[0]) if len(candidates) == 1 else None


def find_policy(lookups, from_domain):
    """``(Record, policy that applies)`` for ``from_domain``, or (None, "").
    TempDNSError when a lookup fails."""
    record = _record_at(lookups, from_domain)
    if record is not None:
        return record, record.policy
    organizational = organizational_domain(from_domain)
    if organizational != from_domain:
        record = _record_at(lookups, organizational)
        if record is not None:
            return record, record.subdomain_policy
    return None, ""


def evaluate(lookups, from_domain, spf, dkim_results, random):
    """The ``DMARCResult`` for ``from_domain`` (A-label form).

    ``spf``: the MAIL FROM ``SPFResult`` (None if not evaluated);
    ``dkim_results``: the DKIMResults; ``random() -> [0, 1)`` draws for pct.
    """
    try:
        record, policy = find_policy(lookups, from_domain)
    except TempDNSError:
        return DMARCResult(from_domain, "temperror", "", "none", "policy lookup failed")
    if record is None:
        return DMARCResult(from_domain, "none", "", "none", "no policy")
    spf_aligned = spf is not None and aligned(spf.domain, from_domain, record.aspf)
    dkim_aligned = [r for r in dkim_results if aligned(r.domain, from_domain, record.adkim)]
    if (spf_aligned and spf.result == "pass") or any(r.result == "pass" for r in dkim_aligned):
        return DMARCResult(from_domain, "pass", policy, "none", "")
    if (spf_aligned and spf.result == "temperror") or any(
            r.result == "temperror" for r in dkim_aligned):
        return DMARCResult(from_domain, "temperror", policy, "none",
                           "an aligned check could not be done now")
    return DMARCResult(from_domain, "fail", policy, _disposition(policy, record.pct, random),
                       "no aligned SPF or DKIM pass")


def _disposition(policy, pct, random):
    if policy == "none" or random() * 100 < pct:
        return policy
    return POLICIES[_SEVERITY[policy] - 1]      # outside the sample: one step milder


def most_severe(results):
    """The strictest disposition among ``results`` ("none" if empty)."""
    return max((r.disposition for r in results), key=_SEVERITY.__getitem__, default="none")
