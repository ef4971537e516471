"""The live auditor: observer, actions, holds, alert store, digest, webhook, queue watch."""

import gzip
import io
import ipaddress
import json

import pytest
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

import appliance.tap  # noqa: F401  (registers every event)
from appliance import cli, events
from appliance.audit import replay
from appliance.audit.actions import Actions, Holds, IActions
from appliance.audit.alerts import AlertStore, Digest, Webhook
from appliance.audit.rules import Settings
from appliance.audit.service import AuditService, QueueWatch
from appliance.envelope import Envelope
from appliance.durable.commit import GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.queue.runner import QueueRunner
from appliance.queue.store import Spool
from appliance.deliver.maildir import MaildirDeliverer
from appliance.testing import FakeDirectory, FakeSpool, capture_events, make_config, value_of


def now_writer(f, *args):
    """Runs the file work at once (instead of in a thread)."""
    return defer.maybeDeferred(f, *args)


class RecordingBans:
    def __init__(self):
        self.calls = []

    def ban(self, network, rule, reason):
        self.calls.append((network, rule, reason))


class RecordingActions:
    def __init__(self):
        self.calls = []

    def ban(self, network, rule, reason):
        self.calls.append(("ban", str(network), rule))

    def hold(self, account, rule):
        self.calls.append(("hold", account, rule))


@pytest.fixture
def auditor():
    actions = RecordingActions()
    service = AuditService(Settings(auth_failures=3, relay_probe_threshold=2, send_spike=2),
                           actions)
    service.startService()
    yield service
    service.stopService()


def test_a_finding_acts_within_the_emit_of_the_event_that_crossed_the_threshold(auditor):
    with capture_events() as seen:
        for n in range(3):
            events.emit("auth.failure", session="s", peer_ip="198.51.100.4", listener="imap",
                        mechanism="LOGIN", account=f"u{n}@example.test", reason="bad")
            if n == 1:
                assert auditor.actions.calls == []
        # No reactor turn in between: the ban is already there when emit returns.
        assert auditor.actions.calls == [("ban", "198.51.100.4/32", "brute_force")]
    [alert] = seen.named("audit.alert")
    assert (alert["rule"], alert["peer_ip"], alert["count"], alert["action"]) == \
        ("brute_force", "198.51.100.4", 3, "ban")
    assert alert["window"] == 900.0


def test_a_send_spike_holds_and_the_alert_names_the_account(auditor):
    with capture_events() as seen:
        for _ in range(2):
            events.emit("smtp.message.accepted", session="s", peer_ip="192.0.2.1",
                        queue_id="q", sender="bob@example.test", recipients=["x@y.test"],
                        size=10, account="bob@example.test")
    assert auditor.actions.calls == [("hold", "bob@example.test", "send_spike")]
    [alert] = seen.named("audit.alert")
    assert (alert["account"], alert["peer_ip"], alert["action"]) == \
        ("bob@example.test", "", "hold")


def test_without_a_ban_service_a_ban_is_an_event():
    actions = Actions(bans=None)
    verifyObject(IActions, actions)
    with capture_events() as seen:
        actions.ban(ipaddress.ip_network("192.0.2.9/32"), "relay_probe", "3 relay attempts")
    [skipped] = seen.named("audit.action_skipped")
    assert (skipped["action"], skipped["target"], skipped["rule"]) == \
        ("ban", "192.0.2.9/32", "relay_probe")
    bans = RecordingBans()
    Actions(bans=bans).ban(ipaddress.ip_network("192.0.2.9/32"), "relay_probe", "why")
    assert bans.calls == [(ipaddress.ip_network("192.0.2.9/32"), "relay_probe", "why")]


# -- holds against the real queue


def queue(tmp_path):
    clock = task.Clock()
    clock.advance(1000)
    writer = GroupCommitWriter(synchronous_runner, None)
    spool = Spool(str(tmp_path / "queue"), writer, synchronous_runner, clock)
    maildir = MaildirDeliverer(str(tmp_path / "mail"), writer, "mx.example.test")
    runner = QueueRunner(spool, FakeDirectory(["carol@example.test"]), maildir, clock)
    runner.startService()
    holds = Holds(runner, spool, str(tmp_path / "audit"), clock, write=now_writer)
    return clock, spool, runner, holds


def submit(runner, qid, account="bob@example.test"):
    envelope = Envelope(queue_id=qid, sender=account, recipients=["carol@example.test"],
                        received_at=runner.clock.seconds(), auth_user=account,
                        listener="submission")
    return value_of(runner.accept(envelope, b"Subject: hi\r\n\r\nspam\r\n"))


def delivered(tmp_path):
    new = tmp_path / "mail" / "example.test" / "carol" / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_a_held_account_s_mail_stays_in_the_queue_until_an_admin_releases_it(tmp_path):
    clock, spool, runner, holds = queue(tmp_path)
    submit(runner, "00000000000000000000000a")
    assert len(delivered(tmp_path)) == 1
    with capture_events() as seen:
        holds.hold("bob@example.test", "send_spike")
        submit(runner, "00000000000000000000000b")
        submit(runner, "00000000000000000000000c", account="dave@example.test")
    assert len(delivered(tmp_path)) == 2                 # dave's, not bob's
    assert spool.get("00000000000000000000000b").held
    assert [e["queue_id"] for e in seen.named("audit.held")] == ["00000000000000000000000b"]
    assert seen.named("audit.hold")[0]["account"] == "bob@example.test"
    # A restart keeps the account held.
    saved = json.loads((tmp_path / "audit" / "holds.json").read_text())
    assert list(saved) == ["bob@example.test"]
    other_spool = Spool(str(tmp_path / "other"), None, synchronous_runner, clock)
    again = Holds(None, other_spool, str(tmp_path / "audit"), clock, write=now_writer)
    again.load()
    assert again.is_held("bob@example.test")
    # The admin releases the message (queue release ID): the account is released with it.
    service = AuditService(Settings(), Actions(holds=holds))
    service.startService()
    try:
        with capture_events() as seen:
            value_of(runner.release("00000000000000000000000b"))
    finally:
        service.stopService()
    assert [e["account"] for e in seen.named("audit.released")] == ["bob@example.test"]
    assert len(delivered(tmp_path)) == 3
    submit(runner, "00000000000000000000000d")
    assert len(delivered(tmp_path)) == 4
    assert json.loads((tmp_path / "audit" / "holds.json").read_text()) == {}


def test_holding_an_account_holds_its_queued_messages_and_release_frees_them(tmp_path):
    clock, spool, runner, holds = queue(tmp_path)
    runner.stopService()                 # nothing is delivered: the messages wait
    submit(runner, "00000000000000000000001a")
    submit(runner, "00000000000000000000001b", account="dave@example.test")
    held = holds.hold("bob@example.test", "send_spike")
    assert held == ["00000000000000000000001a"]
    assert spool.get("00000000000000000000001a").held
    assert not spool.get("00000000000000000000001b").held
    runner.startService()
    assert value_of(holds.release("bob@example.test")) == ["00000000000000000000001a"]
    assert not holds.is_held("bob@example.test")
    assert len(delivered(tmp_path)) == 2


# -- alerts: store, digest, webhook


def test_alert_store_keeps_the_last_n_durably_with_acks(tmp_path):
    store = AlertStore(str(tmp_path), keep=5, write=now_writer)
    for _ in range(12):
        alert_id = store.new_id()
        store.add({"alert_id": alert_id, "rule": "harvesting", "ts": 1.0})
    assert store.ack(12) and not store.ack(1)
    lines = (tmp_path / "alerts.json").read_text().splitlines()
    assert len(lines) <= 2 * 5 + 1
    again = AlertStore(str(tmp_path), keep=5, write=now_writer)
    again.load()
    assert [a["alert_id"] for a in again.latest(10)] == [12, 11, 10, 9, 8]
    assert again.latest(1)[0]["acked"] is True
    assert again.new_id() == 13


def test_digest_is_mailed_at_most_once_per_interval():
    clock = task.Clock()
    spool = FakeSpool()
    digest = Digest(spool, clock, "mx.example.test", "postmaster@example.test", 900,
                    gather=2)
    alert = {"alert_id": 1, "ts": 0.0, "rule": "harvesting", "peer_ip": "192.0.2.1",
             "account": "", "count": 20, "window": 900.0, "action": "ban", "detail": "d"}
    with capture_events() as seen:
        digest.add(alert)
        digest.add(dict(alert, alert_id=2, rule="relay_probe"))
        clock.advance(2)
        assert len(spool.accepted) == 1
        digest.add(dict(alert, alert_id=3))
        clock.advance(800)
        assert len(spool.accepted) == 1
        clock.advance(100)
        assert len(spool.accepted) == 2
        clock.advance(5000)
        assert len(spool.accepted) == 2         # nothing new: no mail
    envelope, body = spool.accepted[0]
    assert envelope.sender == "" and envelope.recipients == ["postmaster@example.test"]
    assert b"Subject: [mailappliance] 2 new alerts: harvesting, relay_probe" in body
    assert b"#2 " in body and b"\r\n" in body
    assert [e["alerts"] for e in seen.named("audit.digest_sent")] == [2, 1]


def test_webhook_retries_a_bounded_number_of_times_then_says_so():
    clock = task.Clock()
    calls = []

    def post(url, body):
        calls.append(json.loads(body))
        return defer.fail(ConnectionRefusedError("refused")) if len(calls) < 3 \
            else defer.succeed(200)
    hook = Webhook("http://127.0.0.1:9/x", clock, post=post, retries=(1, 5))
    hook.send({"alert_id": 7, "rule": "spraying"})
    clock.advance(1)
    clock.advance(5)
    assert [c["alert_id"] for c in calls] == [7, 7, 7]

    def failing(url, body):
        return defer.succeed(500)
    hook = Webhook("http://127.0.0.1:9/x", clock, post=failing, retries=(1, 5))
    with capture_events() as seen:
        hook.send({"alert_id": 8})
        clock.advance(1)
        clock.advance(5)
    [failed] = seen.named("audit.webhook_failed")
    assert (failed["alert_id"], failed["attempts"]) == (8, 3)
    assert "500" in failed["error"]


def test_queue_watch_reports_a_stale_queue_once_per_episode(tmp_path):
    clock, spool, runner, holds = queue(tmp_path)
    runner.stopService()
    watch = QueueWatch(spool, 3600, clock, interval=60)
    watch.startService()
    submit(runner, "00000000000000000000002a")
    with capture_events() as seen:
        clock.advance(3600)
        assert seen.named("queue.stale") == []
        for _ in range(5):
            clock.advance(60)
    [stale] = seen.named("queue.stale")
    assert stale["queue_id"] == "00000000000000000000002a" and stale["delay_warning"] == 3600
    watch.stopService()


# -- live and offline give the same findings


def test_replaying_the_live_log_gives_the_same_findings(tmp_path):
    log = tmp_path / "events.json"
    writer = events.JsonEventFile(str(log))
    events.add_observer(writer)
    actions = RecordingActions()
    settings = Settings(auth_failures=3, spray_threshold=3, harvest_threshold=4,
                        relay_probe_threshold=2, protocol_error_threshold=3, send_spike=3,
                        account_attack_threshold=5)
    live = AuditService(settings, actions)
    live.findings_seen = []
    live.engine.on_finding = lambda f, inner=live._finding: (live.findings_seen.append(f),
                                                           inner(f))
    live.startService()
    try:
        for n in range(40):
            ip = f"192.0.2.{n % 7}"
            events.emit("auth.failure", session="s", peer_ip=ip, listener="submission",
                        mechanism="PLAIN", account=f"u{n % 4}@example.test", reason="bad")
            events.emit("smtp.rcpt.rejected", session="s", peer_ip=f"198.51.100.{n % 3}",
                        recipient="x@example.test", code=550, reason="User unknown",
                        status="5.1.1" if n % 2 else "5.7.1")
            events.emit("smtp.protocol_error", session="s", peer_ip="203.0.113.1",
                        kind="bad_command", detail="X")
            events.emit("smtp.message.accepted", session="s", peer_ip="192.0.2.200",
                        queue_id="q", sender="s@example.test", recipients=["a@b.test"],
                        size=5, account="s@example.test")
            events.emit("smtp.connect", session="s", peer_ip=ip, peer_port=1,
                        listener="mx")
    finally:
        live.stopService()
        events.remove_observer(writer)
        writer.close()
    assert len(live.findings_seen) > 5
    # gzip the first half, keep the second plain, give them newest first.
    lines = log.read_bytes().splitlines(keepends=True)
    first, second = tmp_path / "events.json.1.gz", tmp_path / "events.json.0"
    first.write_bytes(gzip.compress(b"".join(lines[:len(lines) // 2])))
    second.write_bytes(b"".join(lines[len(lines) // 2:]) + b"{not json\n")
    report = replay.replay([str(second), str(first)], settings)
    assert report.findings == live.findings_seen
    assert report.unreadable == 1
    assert report.files == [str(first), str(second)]


def test_the_audit_command_prints_a_table_or_json(tmp_path):
    config = tmp_path / "m.ini"
    config.write_text("[server]\nhostname = mx.example.test\ndomains = example.test\n"
                      "[audit]\nrelay_probe_threshold = 2\n")
    log = tmp_path / "e.json"
    log.write_text("".join(json.dumps({"ts": 1700000000.0 + n, "event": "smtp.rcpt.rejected",
                                       "peer_ip": "192.0.2.8", "status": "5.7.1"}) + "\n"
                           for n in range(2)))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["audit", str(log), "--config", str(config)],
                    cli.IO(stdout=out, stderr=err)) == 0
    text = out.getvalue().splitlines()
    assert text[0].split()[:3] == ["TIME", "(UTC)", "RULE"]
    assert text[1].split()[:5] == ["2023-11-14", "22:13:21", "relay_probe", "192.0.2.8", "2"]
    assert text[-1].startswith("1 finding(s) in 2 event line(s)")
    out = io.StringIO()
    assert cli.main(["audit", "--json", str(log), "--config", str(config)],
                    cli.IO(stdout=out, stderr=err)) == 0
    doc = json.loads(out.getvalue())
    assert [f["rule"] for f in doc["findings"]] == ["relay_probe"]
    err = io.StringIO()
    assert cli.main(["audit", str(tmp_path / "missing"), "--config", str(config)],
                    cli.IO(stdout=io.StringIO(), stderr=err)) == 1
    assert err.getvalue().startswith("mailappliance: ") and "missing" in err.getvalue()
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8bnot really gzip")
    err = io.StringIO()
    assert cli.main(["audit", str(bad), "--config", str(config)],
                    cli.IO(stdout=io.StringIO(), stderr=err)) == 1
    assert "bad.gz" in err.getvalue() and len(err.getvalue().splitlines()) == 1


def test_audit_config_keys_are_checked():
    from appliance.config import ConfigError
    cfg = make_config(audit={"alert_to": "security", "webhook": "https://hooks.example/x"})
    assert cfg.audit.alert_to == "security" and cfg.audit.enabled
    with pytest.raises(ConfigError) as info:
        make_config(audit={"window": "0", "webhook": "ftp://x", "alert_to": "a b",
                           "spray_threshold": "0", "enabld": "on"},
                    limits={"ipv6_prefix": "129"})
    problems = "\n".join(info.value.problems)
    for key in ("[audit] window", "[audit] webhook", "[audit] alert_to",
                "[audit] spray_threshold", "[audit] enabld", "[limits] ipv6_prefix"):
        assert key in problems
