"""Bans, network keys, admission at connect and the sessions a ban ends."""

import ipaddress

import pytest
from twisted.internet import task

from appliance import config
from appliance.defence import admission as admission_module
from appliance.defence import network
from appliance.defence.admission import BANNED, BUSY, DENIED, RATE
from appliance.defence.service import Defences
from appliance.testing import value_of

MINIMAL = "[server]\nhostname = mail.example.test\ndomains = example.test\n"
HOUR = 3600.0


def make_config(limits="", extra=""):
    return config.parse(MINIMAL + "[limits]\n" + limits + "\n" + extra, base_dir="/srv")


def make(limits="", extra="", directory=None, clock=None):
    clock = clock or task.Clock()
    if clock.seconds() == 0:
        clock.advance(1_700_000_000)
    defences = Defences(make_config(limits, extra), clock, directory=directory)
    defences.load()
    return defences, clock


# -- network keys -------------------------------------------------------------

def test_keys_group_ipv6_per_prefix_and_normalise_mapped_ipv4():
    assert network.client_key("192.0.2.7", 64) == "192.0.2.7/32"
    assert network.client_key("::ffff:192.0.2.7", 64) == "192.0.2.7/32"
    assert network.client_key("2001:db8:1:2:a::1", 64) == "2001:db8:1:2::/64"
    assert network.client_key("2001:db8:1:2:a::1", 48) == "2001:db8:1::/48"
    assert network.greylist_key("192.0.2.7", 64) == "192.0.2.0/24"
    assert network.greylist_key("::ffff:192.0.2.7", 64) == "192.0.2.0/24"
    assert network.client_key("not-an-ip", 64) == "not-an-ip"
    assert network.parse_network("::ffff:192.0.2.0/120") == ipaddress.ip_network("192.0.2.0/24")
    with pytest.raises(ValueError):
        network.parse_network("192.0.2.300")


# -- bans ---------------------------------------------------------------------

def test_ban_escalates_doubling_up_to_the_maximum(collected):
    defences, clock = make("ban_time = 1h\nban_time_max = 3h")
    bans = defences.bans
    durations = []
    for _ in range(4):
        ban = bans.ban("192.0.2.9", reason="test")
        durations.append(ban.duration)
        clock.advance(ban.duration)
        defences.state.expire()
    assert durations == [HOUR, 2 * HOUR, 3 * HOUR, 3 * HOUR]
    assert [e["network"] for e in collected.named("defence.ban.expired")] == ["192.0.2.9/32"] * 4
    assert [e["offence"] for e in collected.named("defence.ban")] == [1, 2, 3, 4]


def test_a_ban_in_force_is_not_a_new_offence():
    defences, _ = make()
    first = defences.bans.ban("192.0.2.9")
    again = defences.bans.ban("192.0.2.9")
    assert again.until == first.until and defences.bans.offences("192.0.2.9") == 1


def test_is_banned_by_address_mapped_address_ipv6_prefix_and_wide_network():
    defences, _ = make("ipv6_prefix = 64")
    bans = defences.bans
    bans.ban("192.0.2.9")
    assert bans.is_banned("192.0.2.9") and bans.is_banned("::ffff:192.0.2.9")
    assert bans.is_banned("192.0.2.10") is None
    bans.ban("2001:db8:0:1::5")
    assert bans.is_banned("2001:db8:0:1:ffff::1").network == "2001:db8:0:1::/64"
    assert bans.is_banned("2001:db8:0:2::1") is None
    bans.ban("198.51.100.0/24", duration=60, reason="admin")
    assert bans.is_banned("198.51.100.77").network == "198.51.100.0/24"


def test_unban_and_list(collected):
    defences, _ = make()
    bans = defences.bans
    bans.ban("192.0.2.1", duration=100, reason="a")
    bans.ban("192.0.2.2", duration=50, reason="b", rule="harvest")
    bans.ban("192.0.2.3", duration=0, reason="forever")
    assert [b.network for b in bans.list()] == ["192.0.2.2/32", "192.0.2.1/32", "192.0.2.3/32"]
    assert bans.list()[0].rule == "harvest" and bans.list()[2].until is None
    assert bans.unban("192.0.2.1") is True and bans.unban("192.0.2.1") is False
    assert bans.is_banned("192.0.2.1") is None
    assert collected.named("defence.unban")[0]["network"] == "192.0.2.1/32"


def test_allow_and_trusted_networks_are_never_banned_loopback_is_ordinary(collected):
    defences, _ = make("allow = 127.0.0.1, ::1",
                       "[relay]\ntrusted_networks = 10.0.0.0/8\n")
    bans = defences.bans
    assert bans.ban("127.0.0.1") is None and bans.ban("10.1.2.3") is None
    assert bans.ban("::ffff:127.0.0.1") is None
    assert [e["network"] for e in collected.named("defence.ban.exempt")] == \
        ["127.0.0.1/32", "10.1.2.3/32", "127.0.0.1/32"]
    assert bans.ban("127.0.0.5") is not None            # other loopback: an ordinary client
    bans.ban("127.0.0.0/8", duration=60)
    assert bans.is_banned("127.0.0.1") is None           # a wide ban skips the allowed address
    assert bans.is_banned("127.0.0.2") is not None


def test_bans_survive_a_restart(tmp_path):
    directory = str(tmp_path / "defence")
    defences, clock = make(directory=directory)
    defences.bans.ban("192.0.2.9", reason="brute force")
    defences.bans.ban("198.51.100.0/24", duration=600)
    value_of(defences.state.flush())
    again, _ = make(directory=directory, clock=clock)
    assert again.bans.is_banned("192.0.2.9").reason == "brute force"
    assert again.bans.is_banned("198.51.100.3") is not None
    assert again.bans.offences("192.0.2.9") == 1


# -- admission ------------------------------------------------------------------

def test_deny_wins_then_allow_then_bans_then_busy_then_rate():
    defences, clock = make("deny = 192.0.2.0/24\nallow = 192.0.2.1, 198.51.100.1\n"
                           "connections_per_ip = 2\nconnections_per_minute_per_ip = 3")
    admit = defences.admission.admit
    assert admit("192.0.2.1")[0] == DENIED
    defences.bans.ban("198.51.100.9")
    assert admit("198.51.100.9")[0] == BANNED
    first, second = admit("198.51.100.5"), admit("198.51.100.5")
    assert first[0] is None and second[0] is None
    assert admit("198.51.100.5")[0] == BUSY
    defences.admission.release(first[1])
    assert admit("198.51.100.5")[0] is None              # third new connection this minute
    defences.admission.release(second[1])
    assert admit("198.51.100.5")[0] == RATE
    clock.advance(62)
    assert admit("198.51.100.5")[0] is None
    for _ in range(10):                                   # the allowed address: no limit
        assert admit("198.51.100.1")[0] is None


def test_connections_are_counted_across_listeners_and_released_once():
    defences, _ = make("connections_per_ip = 2")
    adm = defences.admission
    _, a = adm.admit("192.0.2.4", listener="mx")
    _, b = adm.admit("::ffff:192.0.2.4", listener="imap")
    assert adm.admit("192.0.2.4", listener="pop3")[0] == BUSY
    adm.release(a)
    adm.release(a)
    assert adm.open_from("192.0.2.4") == 1 and adm.connections == 1
    adm.release(b)
    assert adm.connections == 0


def test_a_ban_closes_the_open_sessions_of_that_network(collected):
    defences, _ = make("allow = 192.0.2.1")
    closed = []
    defences.admission.admit("192.0.2.8", closer=lambda: closed.append("smtp"))
    defences.admission.admit("192.0.2.8", closer=lambda: closed.append("imap"))
    defences.admission.admit("192.0.2.9", closer=lambda: closed.append("other"))
    defences.admission.admit("192.0.2.1", closer=lambda: closed.append("allowed"))
    defences.bans.ban("192.0.2.8")
    assert sorted(closed) == ["imap", "smtp"]
    defences.bans.ban("192.0.2.0/24", duration=60)
    assert sorted(closed) == ["imap", "other", "smtp"]
    assert defences.admission.connections == 1
    assert [e["count"] for e in collected.named("defence.sessions_closed")] == [2, 1]


def test_refusal_events_are_one_per_network_and_minute_with_a_count(collected):
    defences, clock = make()
    defences.bans.ban("192.0.2.8")
    for _ in range(50):
        defences.admission.admit("192.0.2.8")
    clock.advance(admission_module.REFUSAL_EVENT_INTERVAL)
    defences.admission.admit("192.0.2.8")
    assert [e["count"] for e in collected.named("defence.refused")] == [1, 50]


def test_the_session_whose_failure_bans_answers_first_and_closes_itself():
    defences, _ = make("auth_failures_before_ban = 1")
    closed = []
    _, mine = defences.admission.admit("192.0.2.8", closer=lambda: closed.append("mine"))
    defences.admission.admit("192.0.2.8", closer=lambda: closed.append("other"))
    ban = defences.auth_failed("192.0.2.8", "a@example.test", "f", ticket=mine)
    assert ban is not None and closed == ["other"]
    assert defences.admission.sparing is None


def test_the_front_door_refuses_before_any_session_is_built():
    from twisted.internet import address, protocol
    from twisted.internet.testing import StringTransport

    from appliance.defence.stages import smtp_refusal
    from appliance.net.gate import Gate, GateFront

    defences, _ = make()
    defences.bans.ban("192.0.2.8")
    gate = Gate(defences.config.limits, defences)
    built = []

    class Wrapped(protocol.ServerFactory):
        def buildProtocol(self, addr):
            built.append(addr)
            return protocol.Protocol()

    plain = GateFront(gate, Wrapped(), "mx", smtp_refusal)
    implicit = GateFront(gate, Wrapped(), "submissions")
    banned = address.IPv4Address("TCP", "192.0.2.8", 4000)
    refusal = plain.buildProtocol(banned)
    transport = StringTransport()
    refusal.makeConnection(transport)
    assert transport.value() == b"421 4.7.0 Your address is blocked\r\n"
    assert transport.disconnecting
    assert implicit.buildProtocol(banned) is None
    assert built == []
    plain.buildProtocol(address.IPv4Address("TCP", "192.0.2.9", 4000))
    assert len(built) == 1


def test_the_auditor_s_brute_force_ban_is_left_to_the_in_process_count(collected):
    from appliance.defence.bans import AuditorBans
    defences, _ = make()
    auditor_bans = AuditorBans(defences.bans)
    assert auditor_bans.ban(ipaddress.ip_network("192.0.2.8/32"), reason="x",
                            rule="brute_force") is None
    assert defences.bans.is_banned("192.0.2.8") is None
    assert collected.named("defence.ban.left")[0]["rule"] == "brute_force"
    ban = auditor_bans.ban(ipaddress.ip_network("192.0.2.9/32"), reason="y", rule="harvesting")
    assert ban.rule == "harvesting" and defences.bans.is_banned("192.0.2.9") is not None
    assert [b.network for b in auditor_bans.list()] == ["192.0.2.9/32"]
