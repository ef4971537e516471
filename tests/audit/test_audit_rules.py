"""The auditor's rules over synthetic event records, timed by a task.Clock."""

import ipaddress

import pytest
from twisted.internet.task import Clock

from appliance.audit.rules import BAN, HOLD, NONE, Engine, Settings
from appliance.testing import make_config


class Feed:
    """An Engine plus a clock: ``emit(name, **fields)`` stamps records with the clock."""

    def __init__(self, **settings):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.findings = []
        self.engine = Engine(Settings(**settings), self.findings.append)

    def emit(self, name, **fields):
        self.engine.feed(dict(fields, ts=self.clock.seconds(), event=name))

    def rules(self):
        return [f.rule for f in self.findings]


def test_settings_come_from_the_config():
    cfg = make_config(audit={"window": "10m", "harvest_threshold": "7", "send_spike": "3"},
                      limits={"auth_failures_before_ban": "4", "auth_failure_window": "5m",
                              "ipv6_prefix": "56", "allow": "10.0.0.0/8"},
                      relay={"trusted_networks": "192.0.2.0/24"})
    s = Settings.from_config(cfg)
    assert (s.window, s.harvest_threshold, s.send_spike) == (600, 7, 3)
    assert (s.auth_failures, s.auth_failure_window, s.ipv6_prefix) == (4, 300, 56)
    assert s.never_banned == (ipaddress.ip_network("10.0.0.0/8"),
                              ipaddress.ip_network("192.0.2.0/24"))


def test_brute_force_fires_at_the_threshold_within_the_window():
    feed = Feed(auth_failures=3, auth_failure_window=60)
    for _ in range(2):
        feed.emit("auth.failure", peer_ip="198.51.100.7", account="a@example.test")
        feed.clock.advance(40)
    # The first failure is now 80 s old: out of the window, the count is 2.
    feed.emit("auth.failure", peer_ip="198.51.100.7", account="a@example.test")
    assert feed.findings == []
    feed.clock.advance(1)
    feed.emit("auth.failure", peer_ip="198.51.100.7", account="a@example.test")
    [found] = feed.findings
    assert (found.rule, found.peer_ip, found.count, found.window, found.action) == \
        ("brute_force", "198.51.100.7", 3, 60, BAN)
    assert found.ts == feed.clock.seconds()


def test_a_key_that_fired_is_quiet_for_one_window():
    feed = Feed(auth_failures=2, auth_failure_window=60, spray_threshold=99)
    for _ in range(10):
        feed.emit("auth.failure", peer_ip="198.51.100.7", account="a@example.test")
    assert feed.rules() == ["brute_force"]
    feed.clock.advance(61)
    feed.emit("auth.failure", peer_ip="198.51.100.7", account="a@example.test")
    feed.emit("auth.failure", peer_ip="198.51.100.7", account="a@example.test")
    assert feed.rules() == ["brute_force", "brute_force"]


def test_ipv6_clients_count_per_prefix_and_mapped_ipv4_as_ipv4():
    feed = Feed(auth_failures=3, ipv6_prefix=64, spray_threshold=99)
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
        feed.emit("auth.failure", peer_ip=host, account="a@example.test")
    feed.emit("auth.failure", peer_ip="2001:db8:1:3::1", account="a@example.test")
    for _ in range(3):
        feed.emit("auth.failure", peer_ip="::ffff:192.0.2.9", account="")
    assert [(f.rule, f.peer_ip) for f in feed.findings] == [
        ("brute_force", "2001:db8:1:2::/64"), ("brute_force", "192.0.2.9")]


def test_spraying_counts_distinct_accounts():
    feed = Feed(auth_failures=1000, spray_threshold=3)
    for account in ("a@x.test", "a@x.test", "b@x.test", "a@x.test"):
        feed.emit("auth.failure", peer_ip="203.0.113.5", account=account)
    assert feed.findings == []
    feed.emit("auth.failure", peer_ip="203.0.113.5", account="c@x.test")
    [found] = feed.findings
    assert (found.rule, found.peer_ip, found.count, found.action) == \
        ("spraying", "203.0.113.5", 3, BAN)


def test_account_attack_needs_two_networks_and_never_bans():
    feed = Feed(auth_failures=1000, account_attack_threshold=4, spray_threshold=99)
    for _ in range(6):      # one network only: brute force's business
        feed.emit("auth.failure", peer_ip="203.0.113.5", account="boss@x.test")
    assert feed.findings == []
    feed.emit("auth.failure", peer_ip="203.0.113.6", account="boss@x.test")
    [found] = feed.findings
    assert (found.rule, found.account, found.peer_ip, found.count, found.action) == \
        ("account_attack", "boss@x.test", "", 4, NONE)
    assert "2 networks" in found.detail


def test_harvesting_and_relay_probing_read_the_rcpt_status():
    feed = Feed(harvest_threshold=3, relay_probe_threshold=2)
    for n in range(3):
        feed.emit("smtp.rcpt.rejected", peer_ip="192.0.2.50", recipient=f"u{n}@example.test",
                  code=550, reason="User unknown", status="5.1.1")
        feed.emit("smtp.rcpt.rejected", peer_ip="192.0.2.50", recipient="x@example.test",
                  code=452, reason="Too many recipients", status="4.5.3")
    feed.emit("smtp.rcpt.rejected", peer_ip="192.0.2.51", recipient="v@elsewhere.test",
              code=554, reason="Relay access denied", status="5.7.1")
    feed.emit("smtp.rcpt.rejected", peer_ip="192.0.2.51", recipient="w@elsewhere.test",
              code=554, reason="Relay access denied", status="5.7.1")
    assert [(f.rule, f.peer_ip, f.action) for f in feed.findings] == [
        ("harvesting", "192.0.2.50", BAN), ("relay_probe", "192.0.2.51", BAN)]


def test_protocol_abuse_counts_smtp_errors_long_lines_and_pipelining_after_tls():
    feed = Feed(protocol_error_threshold=4)
    feed.emit("smtp.protocol_error", peer_ip="192.0.2.60", kind="bare_cr_lf", detail="data")
    feed.emit("imap.limit", peer_ip="192.0.2.60", kind="line_length")
    feed.emit("imap.limit", peer_ip="192.0.2.60", kind="timeout")      # not abuse
    feed.emit("pop3.limit", peer_ip="192.0.2.60", kind="line_flood")
    assert feed.findings == []
    feed.emit("smtp.starttls.discarded", peer_ip="192.0.2.60", octets=30)
    [found] = feed.findings
    assert (found.rule, found.count, found.action) == ("protocol_abuse", 4, BAN)


def test_allowed_and_trusted_networks_are_alerted_but_never_banned():
    feed = Feed(relay_probe_threshold=1, never_banned=(ipaddress.ip_network("127.0.0.1/32"),
                                                       ipaddress.ip_network("2001:db8::/32")))
    feed.emit("smtp.rcpt.rejected", peer_ip="127.0.0.1", status="5.7.1")
    feed.emit("smtp.rcpt.rejected", peer_ip="2001:db8:5::1", status="5.7.1")
    feed.emit("smtp.rcpt.rejected", peer_ip="127.0.0.2", status="5.7.1")
    assert [(f.peer_ip, f.action) for f in feed.findings] == [
        ("127.0.0.1", NONE), ("2001:db8:5::/64", NONE), ("127.0.0.2", BAN)]


def test_one_admin_ssh_failure_is_an_alert_and_counts_toward_brute_force():
    feed = Feed(auth_failures=2)
    feed.emit("admin.login_failed", peer_ip="198.51.100.9", user="root",
              key_fingerprint="SHA256:abc")
    assert [(f.rule, f.count, f.action) for f in feed.findings] == [("admin_ssh", 1, NONE)]
    feed.emit("admin.login_failed", peer_ip="198.51.100.9", user="root",
              key_fingerprint="SHA256:abc")
    assert feed.rules() == ["admin_ssh", "brute_force"]


def test_send_spike_holds_the_account():
    feed = Feed(send_spike=3, window=60)
    for _ in range(5):
        feed.emit("smtp.message.accepted", peer_ip="192.0.2.1", account="", queue_id="q")
    feed.emit("smtp.message.accepted", peer_ip="192.0.2.1", account="bob@x.test")
    feed.emit("smtp.message.accepted", peer_ip="192.0.2.1", account="bob@x.test")
    feed.clock.advance(61)
    feed.emit("smtp.message.accepted", peer_ip="192.0.2.1", account="bob@x.test")
    feed.emit("smtp.message.accepted", peer_ip="192.0.2.1", account="bob@x.test")
    assert feed.findings == []
    feed.emit("smtp.message.accepted", peer_ip="192.0.2.1", account="bob@x.test")
    [found] = feed.findings
    assert (found.rule, found.account, found.count, found.action) == \
        ("send_spike", "bob@x.test", 3, HOLD)


@pytest.mark.parametrize("name, fields", [
    ("spool.error", {"operation": "accept", "error": "No space left on device"}),
    ("spool.corrupt", {"queue_id": "q", "reason": "bad json"}),
    ("spool.space_low", {"free_bytes": 1, "free_inodes": 5}),
    ("spool.writer.lost", {"pid": 1, "status": "killed by signal 9"}),
    ("ldap.unavailable", {"url": "ldap://x", "error": "timeout"}),
    ("dkim.sign_failed", {"domain": "x.test", "reason": "no key"}),
    ("queue.stale", {"queue_id": "q", "age": 15000, "delay_warning": 14400}),
])
def test_server_trouble_is_one_alert_per_kind_and_window(name, fields):
    feed = Feed(window=60)
    for _ in range(3):
        feed.emit(name, **fields)
    feed.clock.advance(61)
    feed.emit(name, **fields)
    assert [(f.rule, f.count, f.action) for f in feed.findings] == \
        [("server_trouble", 1, NONE)] * 2
    assert feed.findings[0].detail.startswith(name)


def test_records_without_time_or_ip_are_ignored():
    feed = Feed(auth_failures=1, spray_threshold=1)
    feed.engine.feed({"event": "auth.failure", "peer_ip": "192.0.2.1"})
    feed.emit("auth.failure", peer_ip="", account="a")
    feed.emit("auth.failure", peer_ip="not an ip", account="a")
    feed.emit("smtp.connect", peer_ip="192.0.2.1")
    assert feed.findings == []


def test_idle_keys_are_forgotten():
    feed = Feed(auth_failures=5, auth_failure_window=60, window=60, spray_threshold=99)
    for n in range(100):
        feed.emit("auth.failure", peer_ip=f"192.0.2.{n}", account="a@x.test")
    assert len(feed.engine.brute.hits) == 100
    feed.clock.advance(120)
    feed.emit("auth.failure", peer_ip="198.51.100.1", account="a@x.test")
    assert list(feed.engine.brute.hits) == ["198.51.100.1"]
