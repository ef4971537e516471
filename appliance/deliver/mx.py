"""Where mail for a remote domain goes: MX routing with dnspython (RFC 5321 §5).

``MXResolver.resolve(domain)`` answers a ``Route``: the hosts to try in order,
each with its addresses (IPv4 first, then IPv6), and the port to connect to.
It runs every DNS query of one lookup in a thread (``run_in_thread``, usually
``deferToThread``), because dnspython's resolver blocks (TWISTED-TRAPS T24).

- MX records sorted by preference; equal preferences shuffled (``random``).
- No MX records: the domain's own A/AAAA (the implicit MX, RFC 5321 §5.1).
- Null MX (RFC 7505, ``0 .``): permanent, 5.1.10. NXDOMAIN: permanent, 5.4.4.
- SERVFAIL, timeouts, a CNAME loop: temporary, 4.4.3.
- An MX that is this host (our hostname, public addresses or listeners): the
  records at its preference and above are dropped; nothing left is 5.4.6
  ("loops back to myself", as Postfix says).
- Bounds: ``MAX_HOSTS`` hosts and ``MAX_ADDRESSES`` addresses per route, and
  the whole lookup stops resolving hosts after ``LOOKUP_BUDGET`` DNS timeouts.

``[relay] smarthost`` replaces all of this with one host: its address if it is
an IP, else its A/AAAA (never its MX). A smarthost that cannot be used is the
operator's problem, not the recipient's: it always defers.

``resolve(domain, MAILBOX)`` is the route of an edge (SPEC §7) for a local
domain: ``[relay] mailbox_host``, the same way (its address, or its A/AAAA;
always deferred, never bounced, when it cannot be used; a mailbox host that
is this appliance itself is a loop, deferred too).
"""

import ipaddress
import random as random_module
import time
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.name
import dns.resolver
from twisted.internet import defer
from twisted.python.failure import Failure

from appliance import events
from appliance.deliver.routes import MAILBOX, REMOTE

events.register("dns.error", "a DNS lookup for outbound routing failed",
                ("domain", "kind"))

MAX_HOSTS = 10          # MX hosts kept per route (after sorting)
MAX_ADDRESSES = 20      # addresses kept per route, all hosts together
LOOKUP_BUDGET = 4       # a lookup resolves no new host after this many [dns] timeouts
ROUTE_CACHE_SECONDS = 5.0   # the server's reuse of a route found (MXResolver cache_seconds)
MAX_CACHED_ROUTES = 10000
_WILDCARD = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


@dataclass
class Route:
    """The hosts to try for a domain, in order: ``[(mx_host, [ip, ...]), ...]``."""

    domain: str
    hosts: list
    port: int = 25
    implicit: bool = False        # no MX: the domain's own addresses
    smarthost: bool = False       # [relay] smarthost
    mailbox: bool = False         # an edge's [relay] mailbox_host (SPEC §7)

    @property
    def relay_host(self):
        """One host the operator chose (smarthost or mailbox host): no
        MTA-STS policy of the recipient's domain applies to it."""
        return self.smarthost or self.mailbox

    def addresses(self):
        """``(host, ip)`` pairs in try order."""
        return [(host, ip) for host, ips in self.hosts for ip in ips]


class RoutingError(Exception):
    """No route now. ``permanent``: bounce; else retry later.

    ``status`` is the RFC 3463 code for the DSN: 5.1.10 null MX, 5.4.4 no such
    domain or host, 5.4.6 routing loop, 4.4.3 DNS failure (SERVFAIL, timeout).
    """

    def __init__(self, permanent, status, text):
        super().__init__(f"{status} {text}")
        self.permanent = permanent
        self.status = status
        self.text = text

    @property
    def code(self):
        """The SMTP-style reply code to report with the status."""
        if not self.permanent:
            return 451
        return 554 if self.status == "5.4.6" else 550


class _Lookup:
    """The DNS outcomes of one routing lookup, gathered in the worker thread."""

    def __init__(self, budget):
        self.deadline = time.monotonic() + budget
        self.temporary = None     # the first temporary DNS error met (kind, text)

    def out_of_time(self):
        return time.monotonic() > self.deadline


@dataclass
class _Answer:
    records: list = field(default_factory=list)
    nxdomain: bool = False
    error: tuple = None           # (kind, text) of a temporary failure


def _default_thread_runner(function, *args):
    from twisted.internet import threads
    return threads.deferToThread(function, *args)


def build_resolver(config):
    """A dnspython Resolver for ``[dns] nameservers`` and ``timeout``.

    With no nameservers configured it reads /etc/resolv.conf; a machine
    without one gets 127.0.0.1 (a local caching resolver is the usual setup).
    """
    servers = config.dns.nameservers
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host for server in servers]
        # nameserver_ports (2.3 and later) keeps one port per address.
        resolver.nameserver_ports = {server.host: server.port for server in servers}
    else:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.timeout = config.dns.timeout
    resolver.lifetime = config.dns.timeout
    resolver.cache = dns.resolver.Cache()
    return resolver


class MXResolver:
    """Routes for remote domains; see the module docstring.

    ``run_in_thread(f, *args) -> Deferred`` runs the blocking lookup;
    ``resolver`` is a dnspython Resolver (default: from ``[dns]``);
    ``random`` shuffles equal preferences; ``self_addresses`` adds IPs
    that count as this host besides ``[server] public_addresses`` and
    the listeners.
    """

    def __init__(self, config, run_in_thread=None, resolver=None, random=None,
                 self_addresses=(), clock=None, cache_seconds=0.0):
        self.config = config
        # A route found is reused for ``cache_seconds`` (0: never), and one
        # lookup serves every message asking for the domain while it runs:
        # under load that is one thread hand-over per domain, not per message.
        self.clock = clock
        self.cache_seconds = cache_seconds if clock is not None else 0.0
        self._routes = {}               # domain -> (expires, Route)
        self._in_flight = {}            # domain -> [Deferred] waiting for its lookup
        self.run_in_thread = run_in_thread or _default_thread_runner
        self.resolver = resolver if resolver is not None else build_resolver(config)
        self.random = random or random_module.Random()
        self.hostname = (config.server.hostname or "").lower().rstrip(".")
        self.timeout = config.dns.timeout
        self._own_ips = {ipaddress.ip_address(a) for a in config.server.public_addresses}
        self._own_ips.update(ipaddress.ip_address(a) for a in self_addresses)
        self._listeners = self._listening(config)

    @staticmethod
    def _listening(config):
        """``{(ip, port)}`` of the SMTP listeners, for loop detection."""
        found = set()
        for name in ("mx", "submission", "submissions", "submission_alt"):
            hostport = getattr(config.listen, name)
            if hostport is None:
                continue
            try:
                found.add((ipaddress.ip_address(hostport.host), hostport.port))
            except ValueError:
                continue      # a host name: its address is not known here
        return found

    # -- the public face -----------------------------------------------------

    def resolve(self, domain, kind=REMOTE):
        """``Deferred[Route]`` for ``domain``; errback ``RoutingError``.
        ``kind`` (``appliance.deliver.routes``): REMOTE by MX (or smarthost),
        MAILBOX to ``[relay] mailbox_host``."""
        domain = domain.lower().rstrip(".")
        args = (domain,) if kind == REMOTE else (domain, kind)
        if not self.cache_seconds:
            return self.run_in_thread(self._route, *args).addErrback(self._failed, domain)
        key = domain if kind == REMOTE else (kind, domain)
        cached = self._routes.get(key)
        if cached is not None and cached[0] > self.clock.seconds():
            return defer.succeed(cached[1])
        waiting = self._in_flight.get(key)
        if waiting is not None:
            d = defer.Deferred()
            waiting.append(d)
            return d
        self._in_flight[key] = []
        d = self.run_in_thread(self._route, *args)
        d.addErrback(self._failed, domain)
        d.addBoth(self._settled, key)
        return d

    def _settled(self, result, key):
        """Remember a route found (not a failure) and answer those who waited."""
        waiting = self._in_flight.pop(key, [])
        if not isinstance(result, Failure):
            now = self.clock.seconds()
            if len(self._routes) >= MAX_CACHED_ROUTES:
                self._routes = {k: v for k, v in self._routes.items() if v[0] > now}
            self._routes[key] = (now + self.cache_seconds, result)
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        return result

    def _failed(self, failure, domain):
        if failure.check(RoutingError):
            return failure
        # A resolver bug or an unexpected dnspython error: retry later.
        events.emit("dns.error", domain=domain, kind="internal")
        raise RoutingError(False, "4.4.3", f"DNS lookup for {domain} failed: "
                           f"{failure.getErrorMessage()}")

    @property
    def port(self):
        smarthost = self.config.relay.smarthost
        return smarthost.port if smarthost is not None else self.config.outbound.port

    # -- in the worker thread ------------------------------------------------

    def _route(self, domain, kind=REMOTE):
        lookup = _Lookup(LOOKUP_BUDGET * self.timeout)
        if kind == MAILBOX:
            return self._mailbox_route(domain, lookup)
        smarthost = self.config.relay.smarthost
        if smarthost is not None:
            return self._smarthost_route(domain, smarthost.host.lower(), lookup)
        literal = _address_literal(domain)
        if literal is not None:
            return self._finish(domain, self._addresses_of([(0, literal)], lookup, domain),
                                lookup)
        answer = self._query(domain, "MX")
        if answer.nxdomain:
            self._fail(True, "5.4.4", domain, "nxdomain",
                       f"Host or domain name not found: {domain}")
        if answer.error:
            self._temporary(domain, answer.error)
        if not answer.records:
            hosts = self._addresses_of([(0, _ascii(domain))], lookup, domain)
            return self._finish(domain, hosts, lookup, implicit=True)
        if any(exchange == "" for _pref, exchange in answer.records):
            self._fail(True, "5.1.10", domain, "null_mx",
                       f"Domain {domain} does not accept mail (null MX)")
        ordered = self._order(answer.records)
        return self._finish(domain, self._addresses_of(ordered, lookup, domain), lookup)

    def _smarthost_route(self, domain, host, lookup):
        """The one route through ``[relay] smarthost``."""
        return self._operator_route(domain, "smarthost", host, None, lookup)

    def _mailbox_route(self, domain, lookup):
        """The route of an edge to ``[relay] mailbox_host`` for a local domain."""
        mailbox_host = self.config.relay.mailbox_host
        if mailbox_host is None:
            raise RoutingError(False, "4.3.5", f"no [relay] mailbox_host for {domain}")
        return self._operator_route(domain, "mailbox host", mailbox_host.host.lower(),
                                    mailbox_host.port, lookup)

    def _operator_route(self, domain, what, host, port, lookup):
        """The one host the operator chose (``what``: smarthost or mailbox
        host), on ``port`` (None: ``self.port``).

        Its trouble is the operator's, not the recipient's: a host without an
        address, or one that is ourselves, defers (never bounces); the mail
        waits in the queue.
        """
        try:
            hosts = self._addresses_of([(0, host)], lookup, domain, port)
            return self._finish(domain, hosts, lookup, port=port,
                                smarthost=what == "smarthost", mailbox=what == "mailbox host")
        except RoutingError as e:
            if not e.permanent:
                raise
            status = "4.4.6" if e.status == "5.4.6" else "4.4.3"
            raise RoutingError(False, status, f"{what} {host}: {e.text}") from None

    def _order(self, records):
        """MX records by preference, equal ones shuffled, duplicates dropped."""
        records = list(records)
        self.random.shuffle(records)
        records.sort(key=lambda record: record[0])      # stable: keeps the shuffle
        seen, ordered = set(), []
        for preference, host in records:
            if host not in seen:
                seen.add(host)
                ordered.append((preference, host))
        return ordered

    def _addresses_of(self, records, lookup, domain, port=None):
        """``[(preference, host, [ip...])]``: A then AAAA of each host, bounded.

        A host that is this machine cuts the list there (RFC 5321 §5.1: only
        MXes more preferred than ourselves may be used). ``port``: the port
        the hosts are reached on (default ``self.port``).
        """
        hosts, total = [], 0
        for preference, host in records:
            if len(hosts) >= MAX_HOSTS or total >= MAX_ADDRESSES or lookup.out_of_time():
                break
            literal = _address_literal_ip(host)
            if host == self.hostname:
                ips = []
            else:
                ips = [literal] if literal else self._host_addresses(host, lookup)
            if host == self.hostname or any(self._is_self(ip, port) for ip in ips):
                kept = [entry for entry in hosts if entry[0] < preference]
                if not kept:
                    self._fail(True, "5.4.6", domain, "loop",
                               f"mail for {domain} loops back to myself")
                return kept
            ips = ips[:MAX_ADDRESSES - total]
            if ips:
                hosts.append((preference, host, ips))
                total += len(ips)
        return hosts

    def _host_addresses(self, host, lookup):
        ips = []
        for rdtype in ("A", "AAAA"):
            answer = self._query(host, rdtype)
            if answer.error and lookup.temporary is None:
                lookup.temporary = answer.error
            # An RRset has no order; spread the load like Postfix
            # (smtp_randomize_addresses), IPv4 before IPv6.
            records = sorted(answer.records)
            self.random.shuffle(records)
            ips.extend(records)
        return ips

    def _is_self(self, ip, port=None):
        address = ipaddress.ip_address(ip)
        if address in self._own_ips:
            return True
        port = self.port if port is None else port
        for listen_ip, listen_port in self._listeners:
            if listen_port != port:
                continue
            if address == listen_ip:
                return True
            if listen_ip in _WILDCARD and (address.is_loopback or address in self._own_ips):
                return True
        return False

    def _finish(self, domain, hosts, lookup, implicit=False, smarthost=False, port=None,
                mailbox=False):
        if not hosts:
            if lookup.temporary is not None:
                self._temporary(domain, lookup.temporary)
            what = ("smarthost" if smarthost else "mailbox host" if mailbox
                    else "domain" if implicit else "MX host")
            self._fail(True, "5.4.4", domain, "no_address",
                       f"no address found for the {what} of {domain}")
        return Route(domain=domain, hosts=[(host, ips) for _pref, host, ips in hosts],
                     port=self.port if port is None else port, implicit=implicit,
                     smarthost=smarthost, mailbox=mailbox)

    def _temporary(self, domain, error):
        kind, text = error
        self._fail(False, "4.4.3", domain, kind, text)

    @staticmethod
    def _fail(permanent, status, domain, kind, text):
        events.emit("dns.error", domain=domain, kind=kind)
        raise RoutingError(permanent, status, text)

    def _query(self, name, rdtype):
        """One query: records (MX as (pref, host); A/AAAA as text), or the failure."""
        try:
            qname = dns.name.from_unicode(name)      # absolute: no search list
        except (dns.exception.DNSException, UnicodeError, ValueError):
            return _Answer(nxdomain=True)
        try:
            answer = self.resolver.resolve(qname, rdtype, search=False,
                                           raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return _Answer(nxdomain=True)
        except dns.resolver.NoAnswer:
            return _Answer()
        except dns.message.ChainTooLong:
            return _Answer(error=("cname_loop", f"CNAME chain too long for {name}"))
        except dns.resolver.NoNameservers:
            return _Answer(error=("servfail", f"DNS server failure for {name} ({rdtype})"))
        except dns.exception.Timeout:
            return _Answer(error=("timeout", f"DNS timeout for {name} ({rdtype})"))
        except dns.exception.DNSException as e:
            return _Answer(error=("error", f"DNS error for {name} ({rdtype}): {e}"))
        return _Answer(records=_records(answer, rdtype))


def _records(answer, rdtype):
    if answer.rrset is None:
        return []
    if rdtype == "MX":
        # Host names in A-label form (as TLS and our hostname compare them);
        # the root name "." (a null MX) becomes "".
        return [(rdata.preference, "" if rdata.exchange == dns.name.root
                 else rdata.exchange.to_text(omit_final_dot=True).lower())
                for rdata in answer.rrset]
    return [rdata.address for rdata in answer.rrset]


def _ascii(domain):
    """``domain`` with A-labels (xn--), as DNS and TLS name it."""
    try:
        return dns.name.from_unicode(domain).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return domain


def _address_literal(domain):
    """The IP of a domain literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text.lower().startswith("ipv6:"):
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _address_literal_ip(host):
    """An MX/smarthost 'name' that is an IP address (seen in the wild)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None
