"""Inbound SPF, DKIM and DMARC on the MX listener, and Authentication-Results.

Between the end of DATA and the spool, a message that reached the MX port
from outside (no AUTH, not from ``[relay] trusted_networks``: our own mail is
DKIM-signed instead, ``appliance.policy.dkim_sign``) is checked on a worker
thread (``run_in_thread``: dnspython, pyspf and dkimpy block, T24):

- SPF (``spf_check``) of the HELO name and of MAIL FROM (for the null sender
  MAIL FROM takes the HELO result, RFC 7208 §2.4);
- DKIM (``dkim_verify``) of every signature, bounded;
- DMARC (``dmarc``) for each domain of the From: header (at most
  ``MAX_FROM_DOMAINS``: several From: domains are each held to their policy).

The work per message is bounded (issue 17): a header section over
``MAX_HEADER_OCTETS`` is refused (552 5.3.4) before any check, DKIM and the
From: parse have their own caps, and nothing loops over more than
``REACTOR_OCTETS`` of client data on the reactor thread (below).

What ``[checks]`` does with them:

- ``spf = enforce``: a MAIL FROM ``fail`` (a ``-all`` match) is refused at
  the end of DATA with 550 5.7.23 (after DATA, not at MAIL: one worker-thread
  pass per message, and DMARC needs the same answers). A HELO ``fail`` alone
  is only recorded. ``on``: recorded. ``off``: not checked, except as DMARC's
  input while DMARC is on (a DMARC verdict without SPF would refuse mail that
  SPF alone authenticates); the same holds for ``dkim = off``.
- ``dmarc = enforce``: a ``reject`` disposition is 550 5.7.1 and nothing is
  stored; ``quarantine`` is delivered to each recipient's Junk folder
  (``envelope.params["folder"]``). ``report``: the header only.
- DNS trouble is ``temperror`` and never refuses a message.

Every check that ran is in one ``Authentication-Results:`` field
(``appliance.policy.authresults``) with ``[server] hostname`` as
authserv-id, added on top. Fields in the message that claim our
authserv-id are forgeries and are removed first.
Nothing taken from the client reaches the field unless it is a plain
domain, selector or address token (no CR, LF, ``;`` or comments).

All of a message's DNS queries share a time budget (``BUDGET_TIMEOUTS`` times
``[dns] timeout``); what is still undone when it is spent is ``temperror``.

Answers and SPF results are kept for their TTLs (``appliance.policy.answers``,
negative answers too, RFC 2308). A message of at most ``REACTOR_OCTETS``
without a DKIM-Signature whose every answer is kept, and whose From: fields
are plain (``Name <local@domain>``, ``local@domain``), is checked on the
reactor thread at once: no DNS, no thread hop, bounded work (a few dict
look-ups and one pass over at most ``REACTOR_OCTETS``). Any miss
(``NotCached``) sends it to the worker thread as before, with the same
outcome. With every check off only the removal of forged fields runs: on
the reactor for a message of at most ``REACTOR_OCTETS``, else on the thread.
"""

import random as random_module
import re
from collections import namedtuple
from email.headerregistry import HeaderRegistry

from twisted.internet import defer

from appliance import events
from appliance.address import dns_name, is_ip
from appliance.clock import default_clock
from appliance.policy import dmarc as dmarc_module
from appliance.policy.answers import AnswerCache, NotCached
from appliance.policy.authresults import authentication_results
from appliance.policy.dkim_verify import verify_signatures
from appliance.policy.lookup import Lookups
from appliance.policy.spf_check import check_helo, check_mailfrom
from appliance import replies
from appliance.message import (MAX_FROM_FIELDS, MAX_FROM_OCTETS, field_value, header_block,
                               header_fields, header_safe, strip_forged)

for _name, _description, _fields in (
    ("check.spf", "an SPF check of an inbound message (identity mailfrom or helo)",
     ("session", "peer_ip", "queue_id", "identity", "domain", "result")),
    ("check.dkim", "a DKIM signature of an inbound message was verified",
     ("session", "peer_ip", "queue_id", "domain", "selector", "algorithm", "result",
      "reason")),
    ("check.dmarc", "the DMARC verdict for a From: domain of an inbound message; "
     "action is what was done (none, quarantine, reject)",
     ("session", "peer_ip", "queue_id", "domain", "result", "policy", "disposition",
      "action")),
):
    events.register(_name, _description, _fields)

JUNK = "Junk"
WORKER_THREADS = 16             # checks mostly wait on DNS: threads are cheap here
MAX_FROM_DOMAINS = 5
MAX_HEADER_OCTETS = 1024 * 1024     # a bigger header section is refused before any check
HEADER_TOO_BIG = replies.Reply(552, "5.3.4", "Message header section too large")
BUDGET_TIMEOUTS = 4             # the checks of one message: four [dns] timeouts in all
MIN_BUDGET = 5.0
REACTOR_OCTETS = 64 * 1024      # a bigger message is always checked on the worker thread

_DOMAIN_IN_TEXT = re.compile(r"@([^\s<>\"(),;:@\[\]\\]+)")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
# A From: value the email package parses without defects to this one domain:
# "local@domain", "<local@domain>", "Name <local@domain>", "\"Name\" <local@domain>".
# Unambiguous (no backtracking blow-up): atoms are separated by blanks.
_PLAIN_FROM = re.compile(rf"[ \t]*(?:{_ADDR}|(?:{_ATOM}(?:[ \t]+{_ATOM})*[ \t]*"
                         rf"|\"[^\"\\\r\n@]*\"[ \t]*)?<{_ADDR}>)[ \t]*\Z")

Facts = namedtuple("Facts", "peer_ip helo sender")
Facts.__doc__ = """What the session knows: the client's IP, its HELO name, the MAIL FROM
address ("" for the null sender)."""


class Verdict:
    """The checks' answer for one message.

    ``refusal``: the Reply to refuse it with, or None; ``folder``: the
    Maildir++ folder to deliver into (None: the inbox); ``message``: what to
    store (our Authentication-Results on top, forged ones removed);
    ``spf`` / ``dkim`` / ``dmarc``: the results, for events and tests.
    """

    def __init__(self, message, refusal=None, folder=None, spf=(), dkim=None, dmarc=(),
                 skipped_signatures=0, action="none"):
        self.message = message
        self.refusal = refusal
        self.folder = folder
        self.spf = list(spf)
        self.dkim = None if dkim is None else list(dkim)     # None: DKIM not evaluated
        self.dmarc = list(dmarc)
        self.skipped_signatures = skipped_signatures
        self.action = action


def from_domains(message, fields, plain_only=False):
    """The distinct domains of the From: fields, A-label form, in order, at
    most ``MAX_FROM_DOMAINS``.

    A From: value the email package finds defective (or without an address)
    is also searched for ``@domain`` text: a reader may show such a header,
    so it must not slip past DMARC by being malformed. The parse is bounded:
    only the first ``MAX_FROM_FIELDS`` values of at most ``MAX_FROM_OCTETS``
    go to the email package (about a millisecond per 60 octets); the others
    are searched for ``@domain`` only (one linear pass). A plain value
    (``_PLAIN_FROM``) is read by a regular expression, with the email
    package's outcome; with ``plain_only`` any other value parse is
    ``NotCached`` (the reactor thread parses no more).
    """
    seen, parsed = [], 0
    for name, start, end in fields:
        if name != b"from":
            continue
        text = field_value(message, start, end)
        domains, defective = [], True
        plain = _PLAIN_FROM.match(text) if len(text) <= MAX_FROM_OCTETS else None
        if parsed < MAX_FROM_FIELDS and plain is not None:
            parsed += 1
            domains, defective = [plain.group(1) or plain.group(2)], False
        elif parsed < MAX_FROM_FIELDS and len(text) <= MAX_FROM_OCTETS:
            if plain_only:
                raise NotCached("a From: value for the email package")
            parsed += 1
            try:
                header = HeaderRegistry()("from", text)
                domains = [address.domain for address in header.addresses if address.domain]
                defective = bool(header.defects) or not domains
            except Exception:           # the email package on hostile input
                domains, defective = [], True
        if defective:
            domains += _DOMAIN_IN_TEXT.findall(text)
        for domain in domains:
            ascii_domain = dns_name(domain)
            if ascii_domain is not None and ascii_domain not in seen:
                seen.append(ascii_domain)
                if len(seen) == MAX_FROM_DOMAINS:
                    return seen
    return seen


def site_names(config):
    """The names whose Authentication-Results only our own site writes
    (RFC 8601 §5): the local domains and every name under them (where a
    site's appliances are named: edge1.example.test, mail.example.test),
    and an edge's mailbox host. Mail from outside naming one of them as its
    authserv-id is a forgery and loses that field; an edge's own results
    reach the mailbox host only on mail from its trusted networks."""
    names = set()
    for domain in config.server.domains:
        try:
            names.add(domain.encode("idna").decode("ascii").lower())
        except UnicodeError:
            continue
    mailbox_host = config.relay.mailbox_host
    if mailbox_host is not None and not is_ip(mailbox_host.host):
        names.add(mailbox_host.host.lower())
    return tuple(sorted(names))


# -- the checks -----------------------------------------------------------------

class InboundChecks:
    """See the module docstring.

    ``resolver``: the server's dnspython resolver; ``run_in_thread(f, *args)
    -> Deferred`` runs the blocking part (a thread pool of its own in the
    server, ``synchronous_runner`` in tests); ``random`` draws for DMARC pct;
    ``clock`` (an IReactorTime) times the budget.
    """

    def __init__(self, config, resolver, run_in_thread, random=random_module.random,
                 clock=None):
        self.hostname = config.server.hostname
        self.site = site_names(config)
        self.spf = config.checks.spf
        self.dkim = config.checks.dkim
        self.dmarc = config.checks.dmarc
        self.timeout = config.dns.timeout
        self.budget = max(MIN_BUDGET, BUDGET_TIMEOUTS * config.dns.timeout)
        self.resolver = resolver
        self.run_in_thread = run_in_thread
        self.random = random
        self.clock = default_clock(clock)
        self.answers = AnswerCache(clock=self.clock)

    @property
    def enabled(self):
        return self.spf != "off" or self.dkim or self.dmarc != "off"

    def check(self, facts, message, context, body=None):
        """A Deferred firing with the Verdict for ``message`` (bytes, CRLF);
        ``context`` (session, peer_ip, queue_id) goes into the events.
        ``body``: the ``BodyDigests`` of the body when ``message`` is only
        the header section (the body is in the spool's file, issue 17)."""
        if len(header_block(message)) > MAX_HEADER_OCTETS:
            # The work per message is bounded: no header section of megabytes.
            return defer.succeed(Verdict(message, refusal=HEADER_TOO_BIG, action="reject"))
        if not self.enabled:
            # Still a pass over the header lines: on the reactor for a message
            # of at most REACTOR_OCTETS (no thread hop), else on the pool.
            def stripped():
                return Verdict(strip_forged(message, self.hostname, site=self.site)[0])
            if len(message) <= REACTOR_OCTETS:
                return defer.succeed(stripped())
            return self.run_in_thread(stripped)
        if body is None and len(message) <= REACTOR_OCTETS:
            try:
                verdict = self.evaluate(facts, message, cache_only=True)
            except NotCached:
                pass                # DNS to ask, or more to parse: the worker thread
            else:
                return defer.succeed(self._report(verdict, context))
        d = self.run_in_thread(self.evaluate, facts, message, body)
        d.addCallback(self._report, context)
        return d

    def evaluate(self, facts, message, body=None, cache_only=False):
        """The Verdict; blocking (DNS, RSA): runs on a worker thread. With
        ``cache_only`` it asks no DNS and parses no From: value the hard way
        (``NotCached`` instead), nor any DKIM signature: the reactor may call it.
        ``body``: the ``BodyDigests`` of a streamed body (``message`` is then the header section)."""
        lookups = Lookups(self.resolver, self.timeout, self.budget, self.clock,
                          cache=self.answers, cache_only=cache_only)
        fields = header_fields(message)
        if cache_only and any(name == b"dkim-signature" for name, _s, _e in fields):
            raise NotCached("a DKIM signature to verify")
        if cache_only and self.dmarc != "off" and not dmarc_module.suffixes_loaded():
            raise NotCached("the Public Suffix List is not loaded yet")
        spf_results, mailfrom = [], None
        if self.spf != "off" or self.dmarc != "off":
            helo = check_helo(lookups, facts.peer_ip, facts.helo)
            mailfrom = check_mailfrom(lookups, facts.peer_ip, facts.sender, helo)
            spf_results = [mailfrom, helo]
        dkim_results, skipped = None, 0
        if self.dkim or self.dmarc != "off":
            dkim_results, skipped = verify_signatures(message, lookups, body=body)
            if cache_only and (dkim_results or skipped):
                # A signature dkimpy found (or a header it could not split):
                # verified on the thread, where its key may be fetched.
                raise NotCached("a DKIM signature to verify")
        dmarc_results = []
        if self.dmarc != "off":
            dmarc_results = self._dmarc(lookups, message, fields, mailfrom, dkim_results,
                                        cache_only)
        verdict = Verdict(b"", spf=spf_results, dkim=dkim_results, dmarc=dmarc_results,
                          skipped_signatures=skipped)
        self._decide(verdict, mailfrom)
        cleaned, _ = strip_forged(message, self.hostname, fields, self.site)
        verdict.message = authentication_results(self.hostname, verdict, facts.sender) + cleaned
        return verdict

    def _dmarc(self, lookups, message, fields, mailfrom, dkim_results, cache_only=False):
        domains = from_domains(message, fields, plain_only=cache_only)[:MAX_FROM_DOMAINS]
        if not domains:
            return [dmarc_module.DMARCResult("", "permerror", "", "none",
                                             "no usable From domain")]
        return [dmarc_module.evaluate(lookups, domain, mailfrom, dkim_results or [],
                                      self.random) for domain in domains]

    def _decide(self, verdict, mailfrom):
        if self.spf == "enforce" and mailfrom is not None and mailfrom.result == "fail":
            verdict.refusal, verdict.action = replies.SPF_FAILED, "reject"
            return
        if self.dmarc != "enforce":
            return
        worst = dmarc_module.most_severe(verdict.dmarc)
        if worst == "reject":
            verdict.refusal, verdict.action = replies.DMARC_REJECTED, "reject"
        elif worst == "quarantine":
            verdict.folder, verdict.action = JUNK, "quarantine"

    def _report(self, verdict, context):
        """The events, on the reactor thread (the event log is not thread-safe)."""
        for result in verdict.spf:
            events.emit("check.spf", identity=result.identity, domain=_field(result.domain),
                        result=result.result, **context)
        for result in verdict.dkim or ():
            events.emit("check.dkim", domain=_field(result.domain),
                        selector=_field(result.selector), algorithm=_field(result.algorithm),
                        result=result.result, reason=result.reason, **context)
        for result in verdict.dmarc:
            acted = self.dmarc == "enforce" and result.disposition != "none"
            events.emit("check.dmarc", domain=result.domain, result=result.result,
                        policy=result.policy, disposition=result.disposition,
                        action=verdict.action if acted else "none", **context)
        return verdict


def _field(text):
    """Client-supplied text for an event field: printable, bounded."""
    return header_safe(text)[:255]
