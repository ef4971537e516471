"""Greylisting: triplets, delay and window, network auto-pass, SPF-vouched retries."""

from twisted.internet import defer, task

from appliance import config
from appliance.defence.greylist import DEFER, PASS
from appliance.defence.service import Defences
from appliance.testing import value_of

MINIMAL = "[server]\nhostname = mail.example.test\ndomains = example.test\n"
SENDER, RCPT = "news@big.example", "alice@example.test"


def make(checks="", directory=None, clock=None, spf=None, limits=""):
    clock = clock or task.Clock()
    if clock.seconds() == 0:
        clock.advance(1_700_000_000)
    cfg = config.parse(MINIMAL + "[checks]\ngreylist = on\ngreylist_delay = 5m\n"
                       "greylist_window = 2d\ngreylist_pass_after = 3\ngreylist_keep = 35d\n"
                       + checks + "[limits]\nallow = 127.0.0.1\n" + limits
                       + "[relay]\ntrusted_networks = 10.0.0.0/8\n", base_dir="/srv")
    defences = Defences(cfg, clock, directory=directory, spf=spf)
    defences.load()
    return defences, clock


def check(defences, ip="192.0.2.5", sender=SENDER, rcpt=RCPT, **kw):
    result = defences.greylist.check(ip, sender, rcpt, **kw)
    return value_of(result) if isinstance(result, defer.Deferred) else result


def test_new_triplet_deferred_until_the_delay_then_passed_and_remembered(collected):
    defences, clock = make()
    assert check(defences) is DEFER
    clock.advance(299)
    assert check(defences) is DEFER
    clock.advance(1)
    assert check(defences) is PASS
    clock.advance(30 * 86400)
    assert check(defences) is PASS
    assert [e["reason"] for e in collected.named("defence.greylist.deferred")] == \
        ["new", "early"]
    assert [e["how"] for e in collected.named("defence.greylist.passed")] == ["retry", "known"]


def test_the_network_is_ipv4_slash_24():
    defences, clock = make()
    assert check(defences, ip="192.0.2.5") is DEFER
    clock.advance(300)
    assert check(defences, ip="192.0.2.200") is PASS
    assert check(defences, ip="198.51.100.1") is DEFER


def test_a_retry_after_the_window_starts_over():
    defences, clock = make()
    check(defences)
    clock.advance(2 * 86400 + 1)
    assert check(defences) is DEFER
    clock.advance(300)
    assert check(defences) is PASS


def test_a_network_that_passed_often_enough_is_never_greylisted_again():
    defences, clock = make()
    for n in range(3):
        check(defences, rcpt=f"u{n}@example.test")
    clock.advance(300)
    for n in range(3):
        assert check(defences, rcpt=f"u{n}@example.test") is PASS
    assert check(defences, rcpt="new@example.test", sender="x@y.example") is PASS


def test_exempt_sessions_are_never_greylisted(collected):
    defences, _ = make()
    assert check(defences, authenticated=True) is PASS
    assert check(defences, ip="127.0.0.1") is PASS
    assert check(defences, ip="10.9.9.9") is PASS
    assert check(defences, ip="127.0.0.2") is DEFER         # other loopback: ordinary
    assert len(collected.named("defence.greylist.passed")) == 0


def test_off_means_off():
    cfg = config.parse(MINIMAL, base_dir="/srv")
    off = Defences(cfg, task.Clock())
    assert off.greylist.check("192.0.2.5", SENDER, RCPT) is PASS


def test_a_retry_from_another_network_passes_when_spf_authorises_it(collected):
    asked = []

    def spf(ip, sender):
        asked.append((ip, sender))
        return defer.succeed("pass" if ip.startswith("203.0.113.") else "fail")

    defences, clock = make(spf=spf)
    assert check(defences, ip="198.51.100.7") is DEFER
    clock.advance(120)
    assert check(defences, ip="203.0.114.9") is DEFER       # too early: SPF not even asked
    assert asked == []
    clock.advance(300)
    assert check(defences, ip="203.0.113.10") is PASS       # pool host, vouched for by SPF
    assert asked == [("203.0.113.10", SENDER)]
    assert check(defences, ip="192.0.2.1", rcpt="bob@example.test") is DEFER
    how = [e["how"] for e in collected.named("defence.greylist.passed")]
    assert how == ["spf"]


def test_spf_not_authorising_or_failing_is_a_new_triplet():
    def spf(ip, sender):
        return defer.fail(RuntimeError("DNS down")) if ip.endswith(".1") \
            else defer.succeed("softfail")

    defences, clock = make(spf=spf)
    check(defences, ip="198.51.100.7")
    clock.advance(600)
    assert check(defences, ip="203.0.113.1") is DEFER
    assert check(defences, ip="192.0.2.2") is DEFER
    clock.advance(300)
    assert check(defences, ip="203.0.113.1") is PASS        # its own retry


def test_greylist_state_survives_a_restart(tmp_path):
    directory = str(tmp_path / "defence")
    defences, clock = make(directory=directory)
    check(defences)
    value_of(defences.state.flush())
    clock.advance(300)
    again, _ = make(directory=directory, clock=clock)
    assert check(again) is PASS


def test_ipv6_networks_use_the_prefix():
    defences, clock = make(limits="ipv6_prefix = 48\n")
    check(defences, ip="2001:db8:1:1::1")
    clock.advance(300)
    assert check(defences, ip="2001:db8:1:ffff::2") is PASS
