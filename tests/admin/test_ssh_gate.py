"""The admin SSH listener behind the defences: bans refuse it at connect
(GateFront and the factory's own admit), its connections are counted and
released like the mail ports', and failed logins count toward a ban."""

from twisted.internet import address, error, task
from twisted.internet.testing import StringTransport
from twisted.python import failure

from appliance import config
from appliance.admin import ssh
from appliance.defence.service import Defences
from appliance.net.gate import Gate, GateFront
from appliance.testing import capture_events

MINIMAL = ("[server]\nhostname = mail.example.test\ndomains = example.test\n"
           "[limits]\nallow = 127.0.0.1\nauth_failures_before_ban = 3\n")


def make(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    cfg = config.parse(MINIMAL, base_dir=str(tmp_path))
    defences = Defences(cfg, clock)
    defences.load()
    gate = Gate(cfg.limits, defences)
    host_key = ssh.ensure_host_key(str(tmp_path / "host_key"))
    factory = ssh.AdminFactory(host_key, [], None, clock, lambda files: [], gate=gate)
    factory.startFactory()
    return defences, factory, clock


def peer(ip):
    return address.IPv4Address("TCP", ip, 40000)


def connect(factory, ip):
    t = factory.buildProtocol(peer(ip))
    if t is not None:
        t.makeConnection(StringTransport(peerAddress=peer(ip)))
    return t


def test_a_banned_client_is_closed_at_connect(tmp_path):
    defences, factory, _ = make(tmp_path)
    front = GateFront(factory.gate, factory, "admin_ssh")
    defences.bans.ban("192.0.2.7", duration=600, reason="test")
    with capture_events() as seen:
        assert front.buildProtocol(peer("192.0.2.7")) is None
        assert factory.buildProtocol(peer("192.0.2.7")) is None
    assert seen.named("defence.refused")[0]["listener"] == "admin_ssh"
    assert seen.named("admin.refused")[0]["reason"] == "banned"
    assert front.buildProtocol(peer("192.0.2.8")) is not None


def test_connections_are_counted_released_and_ended_by_a_ban(tmp_path):
    defences, factory, _ = make(tmp_path)
    t = connect(factory, "192.0.2.7")
    assert defences.admission.open_from("192.0.2.7") == 1
    t.connectionLost(failure.Failure(error.ConnectionDone()))
    assert defences.admission.open_from("192.0.2.7") == 0
    t = connect(factory, "192.0.2.7")
    defences.bans.ban("192.0.2.7", duration=600)
    assert t.transport.disconnecting
    assert defences.admission.open_from("192.0.2.7") == 0


def test_failed_logins_count_toward_a_ban(tmp_path):
    defences, factory, _ = make(tmp_path)
    with capture_events() as seen:
        for n in range(3):
            t = connect(factory, "192.0.2.7")
            t.refusals.append(("unknown key", f"SHA256:k{n}", "admin"))
            t.connectionLost(failure.Failure(error.ConnectionDone()))
    assert len(seen.named("admin.login_failed")) == 3
    assert defences.bans.is_banned("192.0.2.7").rule == "auth_failures_before_ban"
    assert factory.buildProtocol(peer("192.0.2.7")) is None
    # [limits] allow is never counted.
    for _ in range(3):
        t = connect(factory, "127.0.0.1")
        t.refusals.append(("unknown key", "SHA256:k", "admin"))
        t.connectionLost(failure.Failure(error.ConnectionDone()))
    assert defences.bans.is_banned("127.0.0.1") is None
