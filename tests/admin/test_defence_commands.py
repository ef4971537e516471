"""The admin commands over the defences: bans list / ban / unban, greylist
list / allow / forget, limits; over real ``Defences`` on a task.Clock."""

import json

from twisted.internet import task

from appliance import config
from appliance.admin.commands import Context, Identity, Sink, dispatch
from appliance.defence.service import Defences
from appliance.testing import capture_events, value_of

MINIMAL = ("[server]\nhostname = mail.example.test\ndomains = example.test\n"
           "[checks]\ngreylist = on\ngreylist_delay = 5m\ngreylist_pass_after = 3\n"
           "[limits]\nallow = 127.0.0.1\nban_time = 1h\nban_time_max = 4h\n"
           "auth_failures_before_ban = 5\nconnections_per_ip = 10\n"
           "messages_per_hour_per_user = 50\n")


class State:
    """The running server as the commands see it (AdminState's ``part``)."""

    def __init__(self, defences):
        self.defences = defences

    def part(self, name):
        return getattr(self, name, None)


class Run:
    def __init__(self, role="admin"):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.cfg = config.parse(MINIMAL, base_dir="/srv")
        self.defences = Defences(self.cfg, self.clock)
        self.defences.load()
        self.role = role

    def __call__(self, *argv):
        out, err = [], []
        ctx = Context(self.cfg, Sink(out.append, err.append, 120),
                      state=State(self.defences), clock=self.clock, audit=True,
                      identity=Identity("root", "SHA256:abc", self.role, "127.0.0.9", "exec"))
        return value_of(dispatch(list(argv), ctx)), out, err


def test_ban_list_and_unban():
    run = Run()
    with capture_events() as seen:
        rc, out, err = run("ban", "192.0.2.7", "2h")
        assert (rc, err) == (0, []) and "192.0.2.7/32" in out[0] and "2h" in out[0]
        assert run("ban", "198.51.100.0/24")[0] == 0      # escalating: ban_time
    bans = run.defences.bans
    assert bans.is_banned("192.0.2.7") and bans.is_banned("198.51.100.9")
    assert seen.named("defence.ban")[0]["duration"] == 7200
    assert [e["command"] for e in seen.named("admin.command")] == [
        "ban 192.0.2.7 2h", "ban 198.51.100.0/24"]

    rc, out, _ = run("bans", "list", "--json")
    rows = json.loads(out[0])
    assert [(r["network"], r["duration"], r["offences"], r["rule"]) for r in rows] == [
        ("198.51.100.0/24", 3600, 1, "admin"), ("192.0.2.7/32", 7200, 0, "admin")]
    rc, out, _ = run("bans", "list")
    assert rc == 0 and out[0].split() == ["NETWORK", "REASON", "RULE", "EXPIRES", "OFFENCES"]
    assert "in 1h0m" in out[-2] and "in 2h0m" in out[-1]

    rc, out, _ = run("unban", "192.0.2.7")
    assert rc == 0 and out == ["unbanned: 192.0.2.7/32"]
    assert not bans.is_banned("192.0.2.7")
    rc, _, err = run("unban", "192.0.2.7")
    assert rc == 1 and err == ["error: not banned: 192.0.2.7/32"]


def test_ban_refuses_bad_words_exempt_networks_and_read_only_keys():
    run = Run()
    assert run("ban", "192.0.2.300")[0] == 2
    rc, _, err = run("ban", "192.0.2.7", "soon")
    assert rc == 2 and "not a duration" in err[0]
    assert run("ban", "192.0.2.7", "0")[0] == 2
    rc, _, err = run("ban", "127.0.0.1")
    assert rc == 1 and "never banned" in err[0]
    assert run.defences.bans.list() == []
    reader = Run(role="read")
    assert reader("ban", "192.0.2.7")[0] == 77
    assert reader("bans", "list")[0] == 0
    assert reader("limits", "192.0.2.7")[0] == 0
    assert reader("greylist", "allow", "192.0.2.7")[0] == 77


def test_greylist_allow_list_and_forget():
    run = Run()
    greylist = run.defences.greylist
    assert greylist.check("203.0.113.5", "a@remote.example", "b@example.test") is False
    rc, out, _ = run("greylist", "list", "--json")
    listed = json.loads(out[0])
    assert listed["networks"] == []
    assert [(p["network"], p["sender"]) for p in listed["pending"]] == [
        ("203.0.113.0/24", "a@remote.example")]

    rc, out, _ = run("greylist", "allow", "192.0.2.9")
    assert (rc, out) == (0, ["passes greylisting: 192.0.2.0/24"])
    assert greylist.check("192.0.2.200", "x@remote.example", "b@example.test") is True
    rc, out, _ = run("greylist", "list")
    assert rc == 0 and any("192.0.2.0/24" in line and "passes" in line for line in out)

    assert run("greylist", "forget", "192.0.2.0/24")[0] == 0
    assert run("greylist", "forget", "203.0.113.5")[0] == 0
    assert greylist.check("192.0.2.200", "y@remote.example", "b@example.test") is False
    assert json.loads(run("greylist", "list", "--json")[1][0])["pending"][0]["sender"] == \
        "y@remote.example"
    rc, _, err = run("greylist", "forget", "198.51.100.1")
    assert rc == 1 and "knows nothing" in err[0]
    assert run("greylist", "allow", "nonsense")[0] == 2


def test_limits_of_a_client_and_of_a_user():
    run = Run()
    defences = run.defences
    verdict, ticket = defences.admission.admit("192.0.2.7")
    assert verdict is None
    assert defences.mail_allowed("192.0.2.7")
    defences.auth_failed("192.0.2.7", "bob@example.test")
    defences.auth_failed("192.0.2.7", "bob@example.test")
    rc, out, _ = run("limits", "192.0.2.7", "--json")
    info = json.loads(out[0])
    counters = {c["counter"]: (c["current"], c["limit"]) for c in info["counters"]}
    assert counters["connections_per_ip"] == (1, 10)
    assert counters["connections_per_minute_per_ip"][0] == 1
    assert counters["messages_per_hour_per_ip"][0] == 1
    assert counters["auth_failures"] == (2, 5)
    assert info["ban"] is None and info["network"] == "192.0.2.7/32"

    run("ban", "192.0.2.7", "5m")
    rc, out, _ = run("limits", "192.0.2.7")
    assert rc == 0 and out[-1].startswith("banned: 192.0.2.7/32, ends in 5m")
    assert any(line.split()[:3] == ["auth_failures", "2", "5"] for line in out)

    assert defences.mail_allowed("192.0.2.7", user="Bob@example.test")
    info = json.loads(run("limits", "bob@example.test", "--json")[1][0])
    assert info["counters"] == [{"counter": "messages_per_hour_per_user", "current": 1,
                                 "limit": 50}]
    assert run("limits", "not-an-address")[0] == 2
