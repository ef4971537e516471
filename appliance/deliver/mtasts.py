"""MTA-STS honoured outbound (RFC 8461): recipients' policies, fetched and cached.

``MTASTSPolicies.policy_for(domain)`` answers (a Deferred) the ``Policy`` to
apply to a delivery, or None (no policy: deliver as usual):

1. ``_mta-sts.DOMAIN`` TXT through ``[dns]`` (in a thread: dnspython
   blocks), at most every TXT_RECHECK seconds per domain; exactly one
   ``v=STSv1`` record with an ``id`` means the domain has a policy;
2. a cached policy with that id and unexpired ``max_age`` is used as is
   (and refetched in the background once older than REFRESH_AFTER);
3. else ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` is fetched: the
   name resolved through ``[dns]``, TLS verified against the system CA
   store for that name, no redirects, 200 and ``text/plain`` only, at most
   MAX_POLICY_BYTES in FETCH_TIMEOUT seconds. A fetch that fails keeps an
   unexpired cached policy (RFC 8461 §5.1); with none, there is no policy.

``Policy.allows(host)`` matches an MX host against the ``mx`` patterns
(``*.example.net`` covers one leftmost label). RemoteDelivery uses it: in
``enforce`` mode only matching hosts are tried, each over STARTTLS with a
certificate verified for the host name, and the recipients are deferred
when none works; in ``testing`` mode delivery goes on as before and every
mismatch is an ``mta_sts.failure`` event.
"""

import re

import dns.exception
import dns.resolver
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.logger import Logger
from twisted.web import client
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from appliance import events

MAX_POLICY_BYTES = 64 * 1024
FETCH_TIMEOUT = 10.0
MAX_AGE_LIMIT = 31557600            # RFC 8461 §3.2: at most a year
TXT_RECHECK = 300.0                 # seconds between _mta-sts lookups per domain
REFRESH_AFTER = 86400.0             # a cached policy is refetched in the background after this
MAX_CACHED = 10000
HTTPS_PORT = 443

_log = Logger()

events.register("mta_sts.policy", "a recipient domain's MTA-STS policy was fetched",
                ("domain", "id", "mode", "max_age", "mx"))
events.register("mta_sts.fetch_failed", "a recipient domain's MTA-STS policy could not be "
                "fetched (a cached one, if any, stays in use)", ("domain", "error"))
events.register("mta_sts.failure", "a delivery did not meet the recipient's MTA-STS policy "
                "(enforce: the host was skipped; testing: delivered anyway)",
                ("queue_id", "domain", "host", "mode", "reason"))


class PolicyError(Exception):
    """A policy that cannot be fetched or parsed (one line)."""


class Policy:
    """A parsed policy: ``mode`` (enforce | testing | none), ``mx`` patterns, ``max_age``."""

    def __init__(self, mode, mx, max_age, policy_id=""):
        self.mode = mode
        self.mx = tuple(mx)
        self.max_age = max_age
        self.id = policy_id

    def allows(self, host):
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, _, rest = host.partition(".")
                if label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def __repr__(self):
        return f"Policy({self.mode!r}, {self.mx!r}, {self.max_age})"


_KEY = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def parse_policy(text, policy_id=""):
    """RFC 8461 §3.2: ``key: value`` lines (LF or CRLF); PolicyError if invalid."""
    fields = {}
    mx = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not _KEY.match(key):
            raise PolicyError(f"not a policy line: {line[:80]!r}")
        if key == "mx":
            mx.append(value.rstrip(".").lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyError("no \"version: STSv1\"")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode {mode!r} is not enforce, testing or none")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or int(max_age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age!r} is not 0..{MAX_AGE_LIMIT}")
    if mode != "none" and not mx:
        raise PolicyError("no mx line")
    return Policy(mode, mx, int(max_age), policy_id)


def sts_id(txt_records):
    """The id of the one ``v=STSv1`` TXT record, or None (none, or several)."""
    found = [t for t in txt_records if re.match(r"v=STSv1\s*(;|$)", t)]
    if len(found) != 1:
        return None
    for part in found[0].split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name == "id" and re.fullmatch(r"[A-Za-z0-9]{1,32}", value):
            return value
    return None


@implementer(IAgentEndpointFactory)
class _PinnedEndpoint:
    """Connect to the address resolved through [dns], TLS verified for the name."""

    def __init__(self, reactor, ip, port, creator):
        self.reactor, self.ip, self.port, self.creator = reactor, ip, port, creator

    def endpointForURI(self, uri):
        kind = endpoints.TCP6ClientEndpoint if ":" in self.ip else endpoints.TCP4ClientEndpoint
        tcp = kind(self.reactor, self.ip, self.port, timeout=FETCH_TIMEOUT)
        return endpoints.wrapClientTLS(self.creator, tcp)


class _Discard(protocol.Protocol):
    """Reads nothing of a response we do not want: the connection is dropped."""

    def connectionMade(self):
        self.transport.stopProducing()

    def connectionLost(self, reason):
        pass


class _BoundedBody(protocol.Protocol):
    def __init__(self, limit):
        self.limit = limit
        self.chunks = []
        self.size = 0
        self.finished = defer.Deferred(lambda d: self._abort())

    def _abort(self):
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data):
        self.size += len(data)
        if self.size > self.limit:
            if not self.finished.called:
                self.finished.errback(PolicyError(f"policy larger than {self.limit} bytes"))
            self._abort()
            return
        self.chunks.append(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        if reason.check(client.ResponseDone, client.PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(PolicyError(f"policy body lost: {reason.getErrorMessage()}"))


class _QuietHTTP11ClientFactory(client._HTTP11ClientFactory):
    noisy = False           # no "Starting factory" line per policy fetch


def _default_creator(hostname):
    return ssl.optionsForClientTLS(hostname, trustRoot=ssl.platformTrust())


ASK = object()      # MTASTSPolicies.known: the answer needs policy_for


class MTASTSPolicies:
    """Fetches and caches recipient domains' policies (see the module docstring).

    ``resolver``: a dnspython Resolver (``[dns]``); ``run_in_thread(f,
    *args)``: a Deferred; ``fetch(domain)`` may replace the HTTPS fetch
    (tests); ``port`` the HTTPS port (443; tests use another).
    """

    def __init__(self, resolver, run_in_thread, reactor, port=HTTPS_PORT,
                 tls_creator=_default_creator, fetch=None):
        self.resolver = resolver
        self._run = run_in_thread
        self.reactor = reactor
        self.port = port
        self._tls_creator = tls_creator
        self._fetch = fetch or self.fetch
        self._cache = {}        # domain -> [policy, fetched_at, expires_at]
        self._txt = {}          # domain -> (id or None, checked_at)
        self._fetching = {}     # domain -> Deferred (one fetch per domain at a time)

    def known(self, domain):
        """What ``policy_for`` would answer without asking anything (the TXT
        record checked within TXT_RECHECK, no fetch or refresh due): the
        Policy or None, or ``ASK`` when only ``policy_for`` can tell. Every
        outbound message asks this first: the answer at hand costs no
        Deferred."""
        domain = domain.rstrip(".").lower()
        now = self.reactor.seconds()
        checked = self._txt.get(domain)
        if checked is None or now - checked[1] >= TXT_RECHECK:
            return ASK
        cached = self._cache.get(domain)
        if cached is None:
            return None if checked[0] is None else ASK
        policy, fetched_at, expires_at = cached
        if (expires_at <= now or now - fetched_at >= REFRESH_AFTER
                or checked[0] not in (None, policy.id)):
            return ASK
        return policy

    @defer.inlineCallbacks
    def policy_for(self, domain):
        domain = domain.rstrip(".").lower()
        now = self.reactor.seconds()
        cached = self._cache.get(domain)
        if cached is not None and cached[2] <= now:
            del self._cache[domain]
            cached = None
        checked = self._txt.get(domain)
        if checked is None or now - checked[1] >= TXT_RECHECK:
            try:
                records = yield self._run(self._lookup_txt, f"_mta-sts.{domain}")
            except Exception as exc:      # a DNS failure: keep what we know
                _log.debug("no _mta-sts answer for {domain}: {error}", domain=domain,
                           error=str(exc))
                records = None
            if records is not None:
                checked = self._txt[domain] = (sts_id(records), now)
                if len(self._txt) > MAX_CACHED:
                    self._txt.pop(next(iter(self._txt)))
        policy_id = checked[0] if checked else None
        if cached is not None:
            policy, fetched_at, _ = cached
            if policy_id is None or policy_id == policy.id:
                if now - fetched_at >= REFRESH_AFTER:
                    self._refresh(domain, policy_id or policy.id)      # not awaited
                return policy
        if policy_id is None:
            return None                 # no policy published (and none cached)
        policy = yield self._refresh(domain, policy_id)
        return policy

    def _refresh(self, domain, policy_id):
        """Fetch now (one at a time per domain); the Deferred fires with the
        policy to use (a failed fetch: the cached one or None), never fails."""
        if domain in self._fetching:
            return _chain(self._fetching[domain])
        d = defer.maybeDeferred(self._fetch, domain)
        self._fetching[domain] = d

        def fetched(text):
            policy = parse_policy(text, policy_id)
            now = self.reactor.seconds()
            self._cache[domain] = [policy, now, now + policy.max_age]
            if len(self._cache) > MAX_CACHED:
                self._cache.pop(next(iter(self._cache)))
            events.emit("mta_sts.policy", domain=domain, id=policy_id, mode=policy.mode,
                        max_age=policy.max_age, mx=list(policy.mx))
            return policy

        def failed(failure):
            error = failure.value
            text = str(error) if isinstance(error, PolicyError) else _describe(error)
            events.emit("mta_sts.fetch_failed", domain=domain, error=text)
            cached = self._cache.get(domain)
            return cached[0] if cached is not None else None

        def done(result):
            self._fetching.pop(domain, None)
            return result
        d.addCallback(lambda body: fetched(body.decode("utf-8", "replace")))
        d.addErrback(failed)
        d.addBoth(done)
        return _chain(d)

    def _lookup_txt(self, name):
        """TXT strings at ``name`` ([] for NXDOMAIN/NODATA); raises on DNS failure."""
        try:
            answer = self.resolver.resolve(name, "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        if answer.rrset is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]

    def _lookup_address(self, name):
        for rdtype in ("A", "AAAA"):
            try:
                answer = self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                raise PolicyError(f"{name} does not exist") from None
            except dns.exception.DNSException as exc:
                raise PolicyError(f"cannot resolve {name}: {exc}") from None
            if answer.rrset is not None:
                return answer.rrset[0].to_text()
        raise PolicyError(f"{name} has no address")

    @defer.inlineCallbacks
    def fetch(self, domain):
        """The policy text (bytes) of ``domain`` over verified HTTPS, bounded."""
        host = f"mta-sts.{domain}"
        ip = yield self._run(self._lookup_address, host)
        pool = client.HTTPConnectionPool(self.reactor, persistent=False)
        pool._factory = _QuietHTTP11ClientFactory
        agent = client.Agent.usingEndpointFactory(
            self.reactor, _PinnedEndpoint(self.reactor, ip, self.port,
                                          self._tls_creator(host)), pool=pool)
        url = f"https://{host}/.well-known/mta-sts.txt".encode("ascii")
        started = self.reactor.seconds()
        request = agent.request(b"GET", url, client.Headers({b"user-agent": [b"mailappliance"]}))
        request.addTimeout(FETCH_TIMEOUT, self.reactor)
        try:
            response = yield request
        except defer.TimeoutError:
            raise PolicyError(f"no answer from {host} within {FETCH_TIMEOUT:.0f} s") from None
        except Exception as exc:
            raise PolicyError(f"cannot fetch from {host}: {_describe(exc)}") from None
        if response.code != 200:
            response.deliverBody(_Discard())
            raise PolicyError(f"{host} answered HTTP {response.code}")
        media = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if media.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Discard())
            raise PolicyError(f"{host} sent {media.decode('latin-1')[:60]!r}, not text/plain")
        if response.length is not client.UNKNOWN_LENGTH and response.length > MAX_POLICY_BYTES:
            response.deliverBody(_Discard())
            raise PolicyError(f"policy larger than {MAX_POLICY_BYTES} bytes")
        body = _BoundedBody(MAX_POLICY_BYTES)
        response.deliverBody(body)
        left = max(0.1, FETCH_TIMEOUT - (self.reactor.seconds() - started))
        body.finished.addTimeout(left, self.reactor)
        try:
            data = yield body.finished
        except defer.TimeoutError:
            raise PolicyError(f"the policy from {host} took over {FETCH_TIMEOUT:.0f} s") \
                from None
        return data


def restrict(policy, addresses, queue_id, domain):
    """``(addresses to try, verified TLS required)`` under ``policy``.

    enforce: only the MX hosts the policy lists, each with verified TLS;
    testing: all of them, a listed-host mismatch recorded as an event; no
    policy or mode none: unchanged.
    """
    if policy is None or policy.mode not in ("enforce", "testing"):
        return addresses, False
    kept, refused = [], set()
    for host, ip in addresses:
        if policy.allows(host):
            kept.append((host, ip))
        elif host not in refused:
            refused.add(host)
            events.emit("mta_sts.failure", queue_id=queue_id, domain=domain, host=host,
                        mode=policy.mode, reason="MX host not listed in the policy")
    if policy.mode == "testing":
        return addresses, False
    return kept, True


def _chain(d):
    """A Deferred firing with ``d``'s result, leaving ``d`` untouched."""
    out = defer.Deferred()

    def relay(result):
        out.callback(result)
        return result
    d.addBoth(relay)
    return out


def _describe(exc):
    reasons = getattr(exc, "reasons", None)         # ResponseNeverReceived & co
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)[:300]
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]
