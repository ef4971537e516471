"""Kept DNS answers and SPF results for the inbound checks (issue 16), and the
reactor-thread path they allow (appliance.policy.answers, lookup, checks).

Real parts: the test DNS server on loopback (with an SOA on negative answers
where RFC 2308 caching is the point), the real resolver, pyspf and dkimpy.
"""

from email.headerregistry import HeaderRegistry

import pytest
from twisted.internet import defer, task

from appliance.deliver.mx import build_resolver
from appliance.policy.answers import AnswerCache, NotCached
from appliance.policy.checks import _PLAIN_FROM, Facts, InboundChecks, from_domains
from appliance.policy.lookup import Lookups
from appliance.policy.spf_check import SPFResult, check_mailfrom
from appliance.message import header_fields
from appliance.testing import make_config
from dns_server import DNSServer

IP = "192.0.2.10"
ZONES = {
    "good.test": {"TXT": [f"v=spf1 ip4:{IP} -all"]},
    "client.good.test": {"TXT": [f"v=spf1 ip4:{IP} -all"]},
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
    "nodmarc.test": {"TXT": [f"v=spf1 ip4:{IP} -all"]},
    "macro.test": {"TXT": ["v=spf1 exists:%{l}.ok.macro.test -all"]},
    "alice.ok.macro.test": {"A": ["127.0.0.2"]},
    "servfail.test": "SERVFAIL",
}


@pytest.fixture(scope="module")
def dns_server():
    with DNSServer(ZONES, ttl=300, negative_ttl=120) as server:
        yield server


@pytest.fixture(scope="module")
def bare_dns():
    """Negative answers without an SOA: not cacheable."""
    with DNSServer(ZONES) as server:
        yield server


def resolver_for(server):
    config = make_config(dns={"nameservers": server.address, "timeout": "2s"})
    resolver = build_resolver(config)
    resolver.cache = None           # every miss of ours reaches the server
    return resolver


def asked(server, name):
    return sum(1 for queried, _type, _transport in server.queries if queried == name)


# -- AnswerCache ----------------------------------------------------------------------

def test_an_entry_lives_its_ttl_and_the_bound_holds():
    clock = task.Clock()
    cache = AnswerCache(max_entries=10, clock=clock)
    cache.put("a", 1, 30)
    cache.put("never", 2, 0)
    assert cache.get("a") == 1 and cache.get("never") is None
    clock.advance(30)
    assert cache.get("a") is None and len(cache) == 0
    for n in range(25):
        cache.put(n, n, 60)
    assert len(cache) <= 10 and cache.get(24) == 24 and cache.get(0) is None


# -- Lookups with the cache --------------------------------------------------------------

def test_answers_are_kept_for_their_ttl_negative_ones_for_the_soa_minimum(dns_server):
    clock = task.Clock()
    cache = AnswerCache(clock=clock)

    def lookups():
        return Lookups(resolver_for(dns_server), 2.0, 8.0, clock, cache=cache)

    assert lookups().txt("good.test") == [f"v=spf1 ip4:{IP} -all".encode()]
    assert lookups().txt("_dmarc.nodmarc.test") == []           # NXDOMAIN
    assert lookups().txt("alice.ok.macro.test") == []           # NODATA (an A only)
    before = len(dns_server.queries)
    assert lookups().txt("good.test") == [f"v=spf1 ip4:{IP} -all".encode()]
    assert lookups().txt("_dmarc.nodmarc.test") == []
    assert lookups().txt("alice.ok.macro.test") == []
    assert len(dns_server.queries) == before                     # all three kept
    clock.advance(121)                                           # past the SOA minimum
    assert lookups().txt("_dmarc.nodmarc.test") == []
    assert lookups().txt("good.test")
    assert len(dns_server.queries) == before + 1                 # the positive one lives on
    clock.advance(200)
    lookups().txt("good.test")
    assert len(dns_server.queries) == before + 2


def test_negative_answers_without_an_soa_and_failures_are_not_kept(bare_dns):
    cache = AnswerCache()
    for _ in range(2):
        assert Lookups(resolver_for(bare_dns), 2.0, 8.0, cache=cache).txt(
            "_dmarc.nodmarc.test") == []
    assert asked(bare_dns, "_dmarc.nodmarc.test") == 2
    assert len(cache) == 0


def test_a_cache_only_lookups_never_asks_dns(dns_server):
    cache = AnswerCache()
    before = len(dns_server.queries)
    with pytest.raises(NotCached):
        Lookups(resolver_for(dns_server), 2.0, 8.0, cache=cache, cache_only=True).txt(
            "nodmarc.test")
    assert len(dns_server.queries) == before
    Lookups(resolver_for(dns_server), 2.0, 8.0, cache=cache).txt("nodmarc.test")
    assert Lookups(None, 2.0, 8.0, cache=cache, cache_only=True).txt("nodmarc.test")


# -- SPF results ------------------------------------------------------------------------

def spf(server, cache, sender, ip=IP, cache_only=False):
    lookups = Lookups(resolver_for(server), 2.0, 8.0, cache=cache, cache_only=cache_only)
    return check_mailfrom(lookups, ip, sender, SPFResult("helo", "client.good.test", "pass"))


def test_an_spf_result_is_kept_per_ip_and_domain(dns_server):
    cache = AnswerCache()
    assert spf(dns_server, cache, "a@good.test").result == "pass"
    assert spf(dns_server, cache, "b@good.test", cache_only=True).result == "pass"
    assert spf(dns_server, cache, "a@good.test", ip="198.51.100.7").result == "fail"
    assert spf(dns_server, cache, "a@good.test", ip="198.51.100.7",
               cache_only=True).result == "fail"
    with pytest.raises(NotCached):
        spf(dns_server, cache, "a@good.test", ip="198.51.100.8", cache_only=True)


def test_macro_and_temperror_results_are_not_kept(dns_server):
    cache = AnswerCache()
    assert spf(dns_server, cache, "alice@macro.test").result == "pass"
    assert spf(dns_server, cache, "bob@macro.test").result == "fail"       # %{l} differs
    assert spf(dns_server, cache, "a@servfail.test").result == "temperror"
    for sender in ("alice@macro.test", "a@servfail.test"):
        with pytest.raises(NotCached):
            spf(dns_server, cache, sender, cache_only=True)


# -- the reactor-thread path -------------------------------------------------------------

def counting_checks(server, **settings):
    ran = []

    def runner(f, *args):
        ran.append(f)
        return defer.maybeDeferred(f, *args)

    options = {"spf": "on", "dkim": "on", "dmarc": "enforce"}
    options.update(settings)
    config = make_config(dns={"nameservers": server.address, "timeout": "2s"},
                         checks=options)
    return InboundChecks(config, build_resolver(config), runner), ran


def message(from_="Alice <alice@good.test>", extra=b""):
    return (f"From: {from_}\r\nTo: bob@example.test\r\nSubject: hi\r\n").encode() + extra + \
        b"\r\nHello.\r\n"


def verdict_of(checks, msg, sender="bounce@good.test"):
    out = []
    checks.check(Facts(IP, "client.good.test", sender), msg, {}).addCallback(out.append)
    return out[0]


def test_a_message_whose_answers_are_kept_is_checked_without_a_thread(dns_server):
    checks, ran = counting_checks(dns_server)
    first = verdict_of(checks, message())
    assert len(ran) == 1 and [r.result for r in first.dmarc] == ["pass"]
    second = verdict_of(checks, message())
    assert len(ran) == 1                                        # on the reactor, no DNS
    assert second.message == first.message
    assert [r.result for r in second.spf] == ["pass", "pass"]
    refused = verdict_of(checks, message(), sender="bounce@nodmarc.test")
    assert len(ran) == 2                                        # a new domain: the thread
    assert refused.refusal is not None                          # no aligned pass: p=reject
    again = verdict_of(checks, message(), sender="bounce@nodmarc.test")
    assert again.refusal == refused.refusal and len(ran) == 2
    no_policy = verdict_of(checks, message("a@nodmarc.test"), sender="bounce@nodmarc.test")
    assert no_policy.dmarc[0].result == "none" and no_policy.refusal is None
    assert len(ran) == 3                # _dmarc.nodmarc.test asked once, its NXDOMAIN kept
    verdict_of(checks, message("a@nodmarc.test"), sender="bounce@nodmarc.test")
    assert len(ran) == 3


def test_signed_big_or_oddly_addressed_messages_still_take_the_thread(dns_server):
    checks, ran = counting_checks(dns_server)
    verdict_of(checks, message())
    signature = b"DKIM-Signature: v=1; a=rsa-sha256; d=good.test; s=sel; h=from; bh=x; b=y\r\n"
    verdict_of(checks, message(extra=signature))
    verdict_of(checks, message(from_="alice@good.test (Alice)"))
    verdict_of(checks, message() + b"x" * (64 * 1024))
    assert len(ran) == 4
    # A signature field dkimpy reads but the field scan names otherwise: the thread too.
    odd = message(extra=signature.replace(b"DKIM-Signature:", b"DKIM-Signature :"))
    assert verdict_of(checks, odd).dkim == run_on_thread(checks, odd).dkim
    assert len(ran) == 5


def test_with_every_check_off_only_a_big_message_takes_the_thread(dns_server):
    checks, ran = counting_checks(dns_server, spf="off", dkim="off", dmarc="off")
    forged = b"Authentication-Results: mx.example.test; spf=pass\r\n"
    small = verdict_of(checks, message(extra=forged))
    assert ran == [] and b"Authentication-Results" not in small.message
    assert small.message == message() and not small.spf and not small.dmarc
    big = verdict_of(checks, message(extra=forged) + b"x" * (64 * 1024))
    assert len(ran) == 1 and big.message == message() + b"x" * (64 * 1024)


def run_on_thread(checks, msg):
    return checks.evaluate(Facts(IP, "client.good.test", "bounce@good.test"), msg)


@pytest.mark.parametrize("value", [
    "a@b.test", " <a@b.test> ", "Alice <alice@example.com>", '"Alice, B" <a.b@x-y.example.org>',
    "A B  C <a@b.test>", "it's me <me@x.test>", "=?utf-8?q?x?= <a@b.test>", "a@-b.test",
])
def test_a_plain_from_value_reads_as_the_email_package_reads_it(value):
    match = _PLAIN_FROM.match(value)
    header = HeaderRegistry()("from", value)
    assert match is not None and not header.defects
    assert [match.group(1) or match.group(2)] == [a.domain for a in header.addresses]
    msg = f"From: {value}\r\n\r\n".encode()
    assert from_domains(msg, header_fields(msg), plain_only=True) == \
        from_domains(msg, header_fields(msg))


@pytest.mark.parametrize("value", [
    "a.@b.test", "<a@b>", "x <a@b.test> y", "A <a@b.test>, B <d@e.test>", '"a@evil.test" <a@b.test>',
    "a@b.test (comment)", "A.B <a@b.test>",
])
def test_other_from_values_are_for_the_email_package(value):
    assert _PLAIN_FROM.match(value) is None
    msg = f"From: {value}\r\n\r\n".encode()
    with pytest.raises(NotCached):
        from_domains(msg, header_fields(msg), plain_only=True)
