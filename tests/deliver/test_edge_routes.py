"""Route kinds (appliance.deliver.routes) and the edge's route to its mailbox
host (appliance.deliver.mx, appliance.deliver.remote), SPEC §7."""

import random

from twisted.internet import defer, task

from appliance.config import HostPort
from appliance.deliver.mx import MXResolver, RoutingError
from appliance.deliver.remote import RemoteDelivery
from appliance.deliver.routes import LOCAL, MAILBOX, REMOTE, Routing
from appliance.envelope import Envelope
from appliance.testing import FakeDirectory, make_config, value_of
from appliance.threads import synchronous_runner

ZONES = {
    "example.test": {"MX": [(10, "edge1.example.test")]},
    "edge1.example.test": {"A": ["127.0.0.4"]},
    "mailbox.example.test": {"A": ["127.0.0.9"], "AAAA": ["::9"]},
    "example.net": {"MX": [(10, "mx1.example.net")]},
    "mx1.example.net": {"A": ["127.0.0.2"]},
    "relay.example.net": {"A": ["127.0.0.3"]},
    "looping.example.test": {"A": ["127.0.0.1"]},
}


def resolver_for(dns, **sections):
    sections["dns"] = {"nameservers": dns.address, "timeout": "2s"}
    return MXResolver(make_config(**sections), synchronous_runner, random=random.Random(1))


def route_of(resolver, domain, kind=REMOTE):
    return value_of(resolver.resolve(domain, kind))


# -- route kinds ----------------------------------------------------------------

def test_a_mailbox_host_keeps_its_local_domains_and_sends_the_rest_by_mx():
    routing = Routing(FakeDirectory(domains=("example.test", "example.org")))
    assert not routing.edge
    assert routing.kind("bob@example.test") == LOCAL
    assert routing.kind("bob@EXAMPLE.org") == LOCAL
    assert routing.kind("bob@example.net") == REMOTE


def test_an_edge_sends_its_local_domains_to_the_mailbox_host():
    config = make_config(relay={"mailbox_host": "mailbox.example.test:2525"})
    routing = Routing.from_config(config, FakeDirectory(domains=("example.test",)))
    assert routing.edge and routing.mailbox_host == HostPort("mailbox.example.test", 2525)
    assert routing.kind("bob@example.test") == MAILBOX
    assert routing.kind("bob@example.net") == REMOTE


def test_directory_trouble_is_a_safe_route_never_a_remote_one():
    broken = FakeDirectory(error=OSError("directory down"))
    assert Routing(broken).kind("bob@example.test") == LOCAL
    assert Routing(broken, HostPort("mailbox.example.test", 25)).kind(
        "bob@example.test") == MAILBOX


# -- the mailbox route ----------------------------------------------------------

def test_the_mailbox_route_is_the_mailbox_host_by_name_not_the_domains_mx(dns):
    resolver = resolver_for(dns, relay={"mailbox_host": "mailbox.example.test:2525"})
    route = route_of(resolver, "example.test", MAILBOX)
    assert route.mailbox and route.relay_host and not route.smarthost
    assert route.port == 2525
    assert route.hosts == [("mailbox.example.test", ["127.0.0.9", "::9"])]
    assert ("example.test", "MX", "udp") not in dns.queries


def test_the_mailbox_route_by_address_needs_no_dns(dns):
    before = len(dns.queries)
    resolver = resolver_for(dns, relay={"mailbox_host": "192.0.2.10"})
    route = route_of(resolver, "example.test", MAILBOX)
    assert route.hosts == [("192.0.2.10", ["192.0.2.10"])] and route.port == 25
    assert len(dns.queries) == before


def test_a_smarthost_serves_other_domains_the_mailbox_host_local_ones(dns):
    resolver = resolver_for(dns, relay={"mailbox_host": "mailbox.example.test",
                                        "smarthost": "relay.example.net:587"})
    outward = route_of(resolver, "example.net")
    assert outward.smarthost and not outward.mailbox and outward.port == 587
    inward = route_of(resolver, "example.test", MAILBOX)
    assert inward.mailbox and inward.port == 25
    assert inward.hosts == [("mailbox.example.test", ["127.0.0.9", "::9"])]


def test_mailbox_and_mx_routes_of_one_domain_are_cached_apart(dns):
    clock = task.Clock()
    config = make_config(dns={"nameservers": dns.address, "timeout": "2s"},
                         relay={"mailbox_host": "mailbox.example.test"})
    resolver = MXResolver(config, synchronous_runner, random=random.Random(1), clock=clock,
                          cache_seconds=5.0)
    assert route_of(resolver, "example.test", MAILBOX).mailbox
    assert not route_of(resolver, "example.test").mailbox
    assert route_of(resolver, "example.test", MAILBOX).mailbox


# -- remote delivery of a mailbox group -------------------------------------------

class RecordingResolver:
    def __init__(self):
        self.asked = []

    def resolve(self, domain, kind=REMOTE):
        self.asked.append((domain, kind))
        return defer.fail(RoutingError(False, "4.4.3", f"no route for {domain} now"))


class NoPolicies:
    def __init__(self):
        self.asked = []

    def policy_for(self, domain):
        self.asked.append(domain)
        return defer.succeed(None)


def test_remote_delivery_asks_for_the_route_of_its_kind():
    resolver = RecordingResolver()
    remote = RemoteDelivery(make_config(relay={"mailbox_host": "mailbox.example.test"}),
                            resolver, task.Clock())
    envelope = Envelope(queue_id="Q1", sender="a@example.net",
                        recipients=["bob@example.test"], received_at=0.0)
    [result] = value_of(remote.deliver(envelope, b"Subject: x\r\n\r\nbody\r\n",
                                       ["bob@example.test"], "example.test", MAILBOX))
    assert resolver.asked == [("example.test", MAILBOX)]
    assert (result.code, result.status) == (451, "4.4.3") and result.deferred
    value_of(remote.deliver(envelope, b"x\r\n", ["carol@example.net"], "example.net"))
    assert resolver.asked[-1] == ("example.net", REMOTE)


def test_the_mailbox_route_skips_the_recipients_mta_sts_policy(dns):
    config = make_config(dns={"nameservers": dns.address, "timeout": "2s"},
                         relay={"mailbox_host": "192.0.2.10:2525"})
    attempts = []

    def connect(ip, port, factory, timeout):
        attempts.append((ip, port))
        return defer.fail(ConnectionRefusedError("refused"))

    remote = RemoteDelivery(config, MXResolver(config, synchronous_runner), task.Clock(),
                            connect=connect)
    remote.mta_sts = NoPolicies()
    envelope = Envelope(queue_id="Q2", sender="a@example.net", recipients=["bob@example.test"],
                        received_at=0.0)
    [result] = value_of(remote.deliver(envelope, b"x\r\n", ["bob@example.test"],
                                       "example.test", MAILBOX))
    assert attempts == [("192.0.2.10", 2525)]
    assert result.deferred and result.status == "4.4.1"
    assert remote.mta_sts.asked == []
