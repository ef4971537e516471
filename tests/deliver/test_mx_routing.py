"""MX routing (appliance.deliver.mx) against a real DNS server on loopback."""

import random
import threading

from dns.resolver import NoNameservers
import pytest
from twisted.internet import task
from twisted.trial import unittest

from appliance.testing import HandRunner as CountingRunner
from appliance.deliver import mx
from appliance.deliver.mx import MXResolver, RoutingError, build_resolver
from appliance.deliver.routes import MAILBOX, REMOTE
from appliance.testing import capture_events, error_of, make_config, thread_recorder, value_of
from appliance.threads import synchronous_runner
from dns_server import DNSServer

ZONES = {
    "example.net": {"MX": [(20, "mx2.example.net"), (10, "mx1.example.net")]},
    "mx1.example.net": {"A": ["127.0.0.2"], "AAAA": ["::2"]},
    "mx2.example.net": {"A": ["127.0.0.3", "127.0.0.4"]},
    "implicit.test": {"A": ["127.0.0.5"], "AAAA": ["::5"]},
    "nothing.test": {"TXT": ["exists, but neither MX nor A"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "slow.test": "HANG",
    "alias.test": {"CNAME": "example.net"},
    "loop1.test": {"CNAME": "loop2.test"},
    "loop2.test": {"CNAME": "loop1.test"},
    "selfmx.test": {"MX": [(10, "mx.example.test")]},
    "backup.test": {"MX": [(10, "mx1.example.net"), (20, "mx.example.test"),
                           (30, "mx2.example.net")]},
    "publicmx.test": {"MX": [(10, "ours.publicmx.test")]},
    "ours.publicmx.test": {"A": ["192.0.2.25"]},
    "lame.test": {"MX": [(10, "missing.lame.test"), (20, "mx2.example.net")]},
    "allgone.test": {"MX": [(10, "missing.allgone.test"), (20, "nodata.allgone.test")]},
    "nodata.allgone.test": {"TXT": ["no address"]},
    "halfbroken.test": {"MX": [(10, "mx.broken.test")]},
    "mx.broken.test": "SERVFAIL",
    "relay.example.net": {"A": ["127.0.0.9"]},
    "xn--bcher-kva.test": {"MX": [(10, "mx1.example.net")]},
    "xn--mller-kva.test": {"A": ["127.0.0.6"]},
    "idnmx.test": {"MX": [(10, "mx.xn--mller-kva.test")]},
    "mx.xn--mller-kva.test": {"A": ["127.0.0.7"]},
    "looping.example.test": {"A": ["127.0.0.1"]},
    "many.test": {"MX": [(i % 7, f"mx{i}.many.test") for i in range(200)]},
    **{f"mx{i}.many.test": {"A": [f"127.1.{i}.1", f"127.1.{i}.2", f"127.1.{i}.3"]}
       for i in range(200)},
}


def resolver_for(dns, timeout="2s", rng=None, **sections):
    sections.setdefault("dns", {})
    sections["dns"] = {"nameservers": dns.address, "timeout": timeout, **sections["dns"]}
    config = make_config(**sections)
    return MXResolver(config, synchronous_runner, random=rng or random.Random(1))


def route_of(resolver, domain, kind=REMOTE):
    return value_of(resolver.resolve(domain, kind))


def routing_error(resolver, domain, kind=REMOTE):
    error = error_of(resolver.resolve(domain, kind))
    assert isinstance(error, RoutingError), error
    return error


def test_mx_hosts_in_preference_order_with_a_then_aaaa(dns):
    route = route_of(resolver_for(dns), "example.net")
    assert route.hosts[0] == ("mx1.example.net", ["127.0.0.2", "::2"])
    assert route.hosts[1][0] == "mx2.example.net"
    assert sorted(route.hosts[1][1]) == ["127.0.0.3", "127.0.0.4"]
    assert route.port == 25 and not route.implicit and not route.smarthost
    assert route.addresses()[0] == ("mx1.example.net", "127.0.0.2")


def test_outbound_port_is_the_route_port(dns):
    route = route_of(resolver_for(dns, outbound={"port": "2526"}), "example.net")
    assert route.port == 2526


def test_equal_preferences_are_shuffled_by_the_injected_random(dns):
    orders = set()
    resolver = resolver_for(dns)        # one resolver: its cache saves the queries
    for seed in range(30):
        resolver.random = random.Random(seed)
        route = route_of(resolver, "many.test")
        names = [host for host, _ips in route.hosts]
        # Only preference 0 fits in the bounds; all of them are mxN with N % 7 == 0.
        assert all(int(name[2:].split(".")[0]) % 7 == 0 for name in names)
        orders.add(tuple(names))
    assert len(orders) > 1


def test_two_hundred_mx_records_are_bounded_and_fetched_over_tcp(dns):
    route = route_of(resolver_for(dns), "many.test")
    assert len(route.hosts) <= mx.MAX_HOSTS
    assert len(route.addresses()) <= mx.MAX_ADDRESSES
    assert len(route.addresses()) == mx.MAX_ADDRESSES     # 3 each: the address bound hits
    assert ("many.test", "MX", "tcp") in dns.queries   # the UDP answer was truncated


def test_no_mx_uses_the_domains_own_addresses(dns):
    route = route_of(resolver_for(dns), "implicit.test")
    assert route.implicit
    assert route.hosts == [("implicit.test", ["127.0.0.5", "::5"])]


def test_neither_mx_nor_address_is_permanent(dns):
    error = routing_error(resolver_for(dns), "nothing.test")
    assert error.permanent and error.status == "5.4.4"


def test_null_mx_is_permanent_5_1_10(dns):
    with capture_events() as seen:
        error = routing_error(resolver_for(dns), "nullmx.test")
    assert error.permanent and error.status == "5.1.10" and error.code == 550
    assert {"domain": "nullmx.test", "kind": "null_mx"}.items() <= \
        seen.named("dns.error")[0].items()


def test_nxdomain_is_permanent_5_4_4(dns):
    error = routing_error(resolver_for(dns), "no-such-domain.test")
    assert error.permanent and error.status == "5.4.4"
    assert "no-such-domain.test" in error.text


def test_servfail_is_temporary(dns):
    with capture_events() as seen:
        error = routing_error(resolver_for(dns), "broken.test")
    assert not error.permanent and error.status == "4.4.3" and error.code == 451
    assert seen.named("dns.error")[0]["kind"] == "servfail"


def test_a_silent_server_is_a_temporary_timeout(dns):
    with capture_events() as seen:
        error = routing_error(resolver_for(dns, timeout="0.3s"), "slow.test")
    assert not error.permanent and error.status == "4.4.3"
    assert seen.named("dns.error")[0]["kind"] == "timeout"


def test_cname_to_a_domain_with_mx_is_followed(dns):
    route = route_of(resolver_for(dns), "alias.test")
    assert [host for host, _ips in route.hosts] == ["mx1.example.net", "mx2.example.net"]


def test_cname_loop_ends_in_a_temporary_error(dns):
    error = routing_error(resolver_for(dns), "loop1.test")
    assert not error.permanent and error.status == "4.4.3"


def test_mx_pointing_at_our_hostname_loops_back_to_myself(dns):
    with capture_events() as seen:
        error = routing_error(resolver_for(dns), "selfmx.test")
    assert error.permanent and error.status == "5.4.6"
    assert "loops back to myself" in error.text
    assert seen.named("dns.error")[0]["kind"] == "loop"


def test_only_mx_hosts_more_preferred_than_ourselves_are_kept(dns):
    # We are the backup MX (preference 20): only the primary may be tried.
    route = route_of(resolver_for(dns), "backup.test")
    assert [host for host, _ips in route.hosts] == ["mx1.example.net"]


def test_mx_at_one_of_our_public_addresses_loops(dns):
    resolver = resolver_for(dns, server={"public_addresses": "192.0.2.25"})
    assert routing_error(resolver, "publicmx.test").status == "5.4.6"
    # Without the public address it is someone else's host.
    assert route_of(resolver_for(dns), "publicmx.test").hosts == [
        ("ours.publicmx.test", ["192.0.2.25"])]


def test_mx_at_our_own_listener_loops_but_anhosts_on_another_port_does_not(dns):
    listening = resolver_for(dns, listen={"mx": "127.0.0.5:2526"},
                             outbound={"port": "2526"})
    assert routing_error(listening, "implicit.test").status == "5.4.6"
    elsewhere = resolver_for(dns, listen={"mx": "127.0.0.5:2526"},
                             outbound={"port": "2527"})
    assert route_of(elsewhere, "implicit.test").hosts[0][0] == "implicit.test"


def test_a_wildcard_listener_makes_loopback_ourselves(dns):
    resolver = resolver_for(dns, listen={"mx": "0.0.0.0:25"})
    assert routing_error(resolver, "example.net").status == "5.4.6"


def test_a_host_without_address_is_skipped(dns):
    route = route_of(resolver_for(dns), "lame.test")
    assert [(host, sorted(ips)) for host, ips in route.hosts] == [
        ("mx2.example.net", ["127.0.0.3", "127.0.0.4"])]


def test_no_mx_host_with_an_address_is_permanent(dns):
    error = routing_error(resolver_for(dns), "allgone.test")
    assert error.permanent and error.status == "5.4.4"


def test_an_mx_host_lookup_failure_is_temporary(dns):
    error = routing_error(resolver_for(dns), "halfbroken.test")
    assert not error.permanent and error.status == "4.4.3"


def test_smarthost_by_name_replaces_the_mx_lookup(dns):
    resolver = resolver_for(dns, relay={"smarthost": "relay.example.net:2525"})
    route = route_of(resolver, "example.net")
    assert route.smarthost and route.port == 2525
    assert route.hosts == [("relay.example.net", ["127.0.0.9"])]
    assert ("example.net", "MX", "udp") not in dns.queries[-2:]


def test_smarthost_by_address_needs_no_dns(dns):
    before = len(dns.queries)
    resolver = resolver_for(dns, relay={"smarthost": "127.0.0.7"})
    route = route_of(resolver, "nullmx.test")
    assert route.hosts == [("127.0.0.7", ["127.0.0.7"])] and route.port == 25
    assert len(dns.queries) == before


def test_an_address_literal_domain_goes_to_that_address(dns):
    route = route_of(resolver_for(dns), "[127.0.0.8]")
    assert route.hosts == [("127.0.0.8", ["127.0.0.8"])]
    route = route_of(resolver_for(dns), "[IPv6:::8]")
    assert route.addresses() == [("::8", "::8")]


def test_an_internationalised_domain_is_looked_up_by_its_a_label(dns):
    route = route_of(resolver_for(dns), "bücher.test")
    assert route.hosts[0][0] == "mx1.example.net"


def test_host_names_are_kept_as_a_labels_for_tls_and_comparison(dns):
    assert route_of(resolver_for(dns), "müller.test").hosts == [
        ("xn--mller-kva.test", ["127.0.0.6"])]
    assert route_of(resolver_for(dns), "idnmx.test").hosts == [
        ("mx.xn--mller-kva.test", ["127.0.0.7"])]


def test_the_addresses_of_one_host_are_shuffled_too(dns):
    orders = {tuple(route_of(resolver_for(dns, rng=random.Random(seed)),
                             "example.net").hosts[1][1]) for seed in range(20)}
    assert orders == {("127.0.0.3", "127.0.0.4"), ("127.0.0.4", "127.0.0.3")}


# -- the one host the operator chose: [relay] smarthost or mailbox_host -----------------

@pytest.mark.parametrize("relay, domain, kind, named", [
    ({"smarthost": "gone.example.net:25"}, "example.net", REMOTE, "smarthost gone.example.net"),
    ({"mailbox_host": "gone.example.test"}, "example.test", MAILBOX,
     "mailbox host gone.example.test"),
])
def test_an_operator_host_without_address_defers_instead_of_bouncing(dns, relay, domain, kind,
                                                                      named):
    error = routing_error(resolver_for(dns, relay=relay), domain, kind)
    assert not error.permanent and error.status == "4.4.3"
    assert named in error.text


@pytest.mark.parametrize("key, host, domain, kind", [
    ("smarthost", "127.0.0.1", "example.net", REMOTE),
    ("mailbox_host", "looping.example.test", "example.test", MAILBOX),     # by name
])
def test_an_operator_host_that_is_ourselves_defers_as_a_loop(dns, key, host, domain, kind):
    listen = {"mx": "127.0.0.1:8025"}
    error = routing_error(resolver_for(dns, relay={key: f"{host}:8025"}, listen=listen),
                          domain, kind)
    assert not error.permanent and error.status == "4.4.6"
    # The same address on another port is another server: no loop.
    resolver = resolver_for(dns, relay={key: f"{host}:2600"}, listen=listen)
    assert route_of(resolver, domain, kind).hosts == [(host, ["127.0.0.1"])]


def test_build_resolver_honours_nameserver_port_and_timeout(dns):
    config = make_config(dns={"nameservers": dns.address, "timeout": "3s"})
    resolver = build_resolver(config)
    assert resolver.nameservers == ["127.0.0.1"]
    assert resolver.nameserver_ports == {"127.0.0.1": dns.port}
    assert resolver.lifetime == 3.0
    answer = resolver.resolve("mx1.example.net", "A", search=False)
    assert [r.address for r in answer] == ["127.0.0.2"]


def test_an_unexpected_resolver_error_is_temporary():
    class Exploding:
        def resolve(self, *args, **kwargs):
            raise RuntimeError("resolver bug")

    resolver = MXResolver(make_config(), synchronous_runner, resolver=Exploding())
    with capture_events() as seen:
        error = routing_error(resolver, "example.net")
    assert not error.permanent and error.status == "4.4.3"
    assert seen.named("dns.error")[0]["kind"] == "internal"


class ThreadedLookupTests(unittest.TestCase):
    """With the default runner the lookup runs in the reactor's thread pool."""

    def setUp(self):
        self.server = DNSServer(ZONES).start()
        self.addCleanup(self.server.stop)

    def test_lookup_runs_off_the_reactor_thread(self):
        config = make_config(dns={"nameservers": self.server.address, "timeout": "2s"})
        resolver = MXResolver(config)
        resolver._route, threads = thread_recorder(resolver._route)
        d = resolver.resolve("example.net")
        self.assertFalse(d.called)          # nothing blocked the caller

        def check(route):
            self.assertEqual(route.hosts[0][0], "mx1.example.net")
            self.assertIsNot(threads[0], threading.main_thread())

        return d.addCallback(check)


def test_the_test_dns_server_answers_txt_nodata_and_refused():
    zones = {"spf.test": {"TXT": ['v=spf1 ip4:192.0.2.0/24 "quoted" -all']},
             "closed.test": "REFUSED"}
    with DNSServer(zones) as server:
        resolver = build_resolver(make_config(dns={"nameservers": server.address,
                                                   "timeout": "2s"}))
        [txt] = resolver.resolve("spf.test", "TXT", search=False)
        assert b"".join(txt.strings) == b'v=spf1 ip4:192.0.2.0/24 "quoted" -all'
        answer = resolver.resolve("spf.test", "A", search=False, raise_on_no_answer=False)
        assert answer.rrset is None                         # NODATA, not NXDOMAIN
        with pytest.raises(NoNameservers):      # REFUSED from every server
            resolver.resolve("closed.test", "A", search=False)
        server.zones["late.test"] = {"A": ["192.0.2.9"]}     # zones change while running
        assert [r.address for r in resolver.resolve("late.test", "A", search=False)] == \
            ["192.0.2.9"]


# -- the route cache of the running server -------------------------------------

def cached_resolver(dns, runner):
    config = make_config(dns={"nameservers": dns.address, "timeout": "2s"})
    return MXResolver(config, runner, random=random.Random(1), clock=task.Clock(),
                      cache_seconds=5)


def test_one_lookup_serves_every_message_asking_while_it_runs(dns):
    runner = CountingRunner()
    resolver = cached_resolver(dns, runner)
    results = []
    for _ in range(3):
        resolver.resolve("example.net").addBoth(results.append)
    assert len(runner.calls) == 1 and results == []
    runner.step()
    assert len(results) == 3 and all(r is results[0] for r in results)
    assert results[0].hosts


def test_a_route_is_reused_until_the_cache_time_runs_out(dns):
    runner = CountingRunner()
    resolver = cached_resolver(dns, runner)
    resolver.resolve("example.net")
    runner.step()
    resolver.clock.advance(4.9)
    results = []
    resolver.resolve("example.net").addBoth(results.append)
    assert runner.calls == [] and len(results) == 1
    resolver.clock.advance(0.2)
    resolver.resolve("example.net")
    assert len(runner.calls) == 1           # expired: looked up again


def test_failures_are_not_cached_but_reach_everyone_waiting(dns):
    runner = CountingRunner()
    resolver = cached_resolver(dns, runner)
    results = []
    resolver.resolve("missing.test").addBoth(results.append)
    resolver.resolve("missing.test").addBoth(results.append)
    runner.step()
    assert len(results) == 2 and all(r.check(RoutingError) for r in results)
    resolver.resolve("missing.test").addBoth(results.append)
    assert len(runner.calls) == 1           # asked again
