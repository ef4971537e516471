"""The queue manager: remote scheduling, caps, retries, expiry, DSNs, restarts, admin.

Everything runs on a real Spool and real Maildirs in a temp directory, a
synchronous group-commit writer, a task.Clock and a fake RemoteDelivery whose
answers the test gives by hand.
"""

import email
import email.policy
import os

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from appliance.deliver.maildir import MaildirDeliverer
from appliance.deliver.mx import RoutingError
from appliance.deliver.remote import RecipientResult
from appliance.deliver.routes import REMOTE
from appliance.envelope import Envelope
from appliance.queue.bounce import BOUNCE_LISTENER, Bouncer
from appliance.durable.commit import GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.queue.manager import Dispatcher, QueueSettings, WakeupSchedule
from appliance.queue.runner import QueueError, QueueRunner
from appliance.envelope import DEFERRED, DELIVERED, PENDING
from appliance.queue.store import Spool
from appliance.testing import FakeDirectory, capture_events, make_config

HOST = "mx.example.test"
USERS = {"alice@example.test": ["alice@example.test"],
         "bob@example.test": ["bob@example.test"],
         "postmaster@example.test": ["postmaster@example.test"],
         "fwd@example.test": ["bob@example.test", "x@remote.example"]}
MESSAGE = (b"Received: from client by mx.example.test\r\nFrom: <alice@example.test>\r\n"
           b"Subject: hello there\r\nMessage-ID: <m1@example.test>\r\n\r\nbody\r\n")


class Directory(FakeDirectory):
    """FakeDirectory that, like the real one, resolves other domains to themselves."""

    def answer(self, address):
        if not self.is_local_domain(address.rpartition("@")[2]):
            return [address]
        return super().answer(address)


class FakeRemote:
    """RemoteDelivery: every deliver() waits until the test answers it."""

    def __init__(self):
        self.calls = []

    def deliver(self, envelope, message, recipients, domain, kind=REMOTE):
        call = Call(envelope, message, list(recipients), domain, kind)
        self.calls.append(call)
        return call.d

    def pending(self):
        return [c for c in self.calls if not c.d.called]

    def answer_all(self, code=250, text="2.0.0 ok"):
        for call in self.pending():
            call.answer(code, text)


class Call:
    def __init__(self, envelope, message, recipients, domain, kind=None):
        self.envelope, self.message, self.recipients, self.domain = (
            envelope, message, recipients, domain)
        self.kind = kind
        self.d = defer.Deferred()

    def answer(self, code=250, text="2.0.0 ok", per_recipient=None):
        per_recipient = per_recipient or {}
        results = []
        for rcpt in self.recipients:
            c, t = per_recipient.get(rcpt, (code, text))
            status = t.split(" ", 1)[0] if t[:1] in "245" else f"{str(c)[0]}.0.0"
            results.append(RecipientResult(rcpt, c, status, t, f"mx.{self.domain}", True,
                                           "192.0.2.25"))
        self.d.callback(results)


class Env:
    def __init__(self, root, clock=None, settings=None, remote=None, users=USERS,
                 random=lambda: 0.0):
        self.root = root
        if clock is None:
            clock = task.Clock()
            clock.advance(1000)
        self.clock = clock
        self.writer = GroupCommitWriter(synchronous_runner)
        self.spool = Spool(str(root / "queue"), self.writer, synchronous_runner, clock)
        maildir = MaildirDeliverer(str(root / "mail"), self.writer, HOST)
        self.directory = Directory(users, domains=("example.test",))
        self.remote = remote if remote is not None else FakeRemote()
        self.settings = settings or QueueSettings(retry=(60.0, 300.0), max_age=86400.0,
                                                  delay_warning=0.0)
        self.runner = QueueRunner(self.spool, self.directory, maildir, clock,
                                  settings=self.settings, remote=self.remote, random=random)
        self.bouncer = self.runner.bouncer = Bouncer(self.runner, clock, HOST,
                                                     "postmaster@example.test")

    def start(self):
        self.runner.startService()
        return self

    def accept(self, recipients, sender="alice@example.test", qid=None, message=MESSAGE,
               listener="submission"):
        envelope = Envelope(queue_id=qid or "", sender=sender, recipients=list(recipients),
                            received_at=self.clock.seconds(), listener=listener,
                            size=len(message))
        out = []
        self.runner.accept(envelope, message).addBoth(out.append)
        assert isinstance(out[0], str), out[0]
        return out[0]

    def state(self, qid, rcpt):
        return self.spool.get(qid).recipients[rcpt]

    def mails(self, user):
        box = self.root / "mail" / "example.test" / user
        found = []
        for sub in ("new", "cur"):
            if (box / sub).is_dir():
                found += [box / sub / name for name in sorted(os.listdir(box / sub))]
        return found

    def parsed(self, user):
        return [email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32)
                for p in self.mails(user)]


def dsn_fields(message):
    """The delivery-status part as a list of {field: value} blocks."""
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, headers = message.get_payload()
    assert human.get_content_type() == "text/plain"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert status.get_content_type() == "message/delivery-status"
    return [dict(block.items()) for block in status.get_payload()]


def test_remote_recipients_go_one_transaction_per_domain_and_are_then_removed(tmp_path):
    env = Env(tmp_path).start()
    qid = env.accept(["a@one.example", "b@one.example", "c@two.example", "bob@example.test"])
    assert len(env.mails("bob")) == 1                       # local: at once
    calls = sorted(env.remote.calls, key=lambda c: c.domain)
    assert [(c.domain, c.recipients) for c in calls] == [
        ("one.example", ["a@one.example", "b@one.example"]), ("two.example", ["c@two.example"])]
    assert calls[0].message == MESSAGE and calls[0].envelope.sender == "alice@example.test"
    calls[0].answer()
    assert env.state(qid, "a@one.example")["state"] == DELIVERED
    assert env.state(qid, "a@one.example")["remote_host"] == "mx.one.example"
    assert env.state(qid, "c@two.example")["state"] == PENDING
    calls[1].answer()
    assert env.spool.get(qid) is None and os.listdir(tmp_path / "queue") == []


def test_the_last_remote_result_is_recorded_by_a_durable_removal_alone(tmp_path):
    env = Env(tmp_path).start()
    qid = env.accept(["a@one.example"])
    updates, removals = [], []
    env.spool.update = lambda *args, **kw: updates.append(args)
    real_remove = env.spool.remove
    env.spool.remove = lambda q, durable=False: (removals.append((q, durable)),
                                                 real_remove(q, durable))[1]
    [call] = env.remote.calls
    call.answer()
    assert updates == [] and removals == [(qid, True)]
    assert env.spool.get(qid) is None and os.listdir(tmp_path / "queue") == []


def test_global_and_per_domain_caps_are_respected(tmp_path):
    settings = QueueSettings(retry=(60.0,), concurrency=4, per_domain=2)
    env = Env(tmp_path, settings=settings).start()
    for n in range(6):
        for domain in ("a.example", "b.example", "c.example"):
            env.accept([f"u{n}@{domain}"])
    seen = []
    while env.remote.pending():
        pending = env.remote.pending()
        per_domain = {d: sum(c.domain == d for c in pending) for d in ("a.example",
                                                                       "b.example",
                                                                       "c.example")}
        assert len(pending) <= 4 and max(per_domain.values()) <= 2
        pending[0].answer()
        seen.append(pending[0].recipients[0])
    assert len(seen) == 18 and env.spool.queue_ids() == []
    assert env.runner.outbound.peak == 4 and max(env.runner.outbound.peak_by_key.values()) == 2
    # Within a domain, messages go in the order they came.
    assert [r for r in seen if r.endswith("a.example")] == [f"u{n}@a.example" for n in range(6)]


def test_one_busy_domain_does_not_starve_the_others(tmp_path):
    env = Env(tmp_path, settings=QueueSettings(concurrency=2, per_domain=2)).start()
    for n in range(10):
        env.accept([f"u{n}@busy.example"])
    env.accept(["x@quiet.example"])
    env.remote.pending()[0].answer()
    assert "quiet.example" in [c.domain for c in env.remote.pending()]


def test_retries_follow_the_schedule_with_bounded_jitter_and_the_last_step_repeats(tmp_path):
    draws = iter([0.0, 0.5, 0.999, 0.25])
    settings = QueueSettings(retry=(60.0, 300.0), jitter=0.1, max_age=10**6)
    env = Env(tmp_path, settings=settings, random=lambda: next(draws)).start()
    qid = env.accept(["a@remote.example"])
    waits = []
    for _ in range(4):
        before = env.clock.seconds()
        env.remote.pending()[0].answer(421, "4.7.0 try later")
        when = env.state(qid, "a@remote.example")["next_attempt"]
        waits.append(round(when - before, 6))
        env.clock.advance(when - before - 0.001)
        assert env.remote.pending() == []                   # not a moment early
        env.clock.advance(0.001)
    assert waits == [60.0, 300.0 * 1.05, 300.0 * 1.0999, 300.0 * 1.025]
    state = env.state(qid, "a@remote.example")
    assert state["attempts"] == 4 and state["state"] == DEFERRED
    assert state["last_error"] == "host mx.remote.example said: 421 4.7.0 try later"


def test_due_messages_are_attempted_in_order_of_their_retry_time(tmp_path):
    env = Env(tmp_path, settings=QueueSettings(retry=(100.0,), concurrency=1)).start()
    qids = []
    for n, domain in enumerate(("c.example", "a.example", "b.example")):
        qids.append(env.accept([f"u@{domain}"]))
        env.remote.pending()[0].answer(451, "4.3.0 later")
        env.clock.advance(10)          # deferred at 1000, 1010, 1020: due 1100, 1110, 1120
    assert len(env.clock.getDelayedCalls()) == 1           # one timer for the whole queue
    env.clock.advance(200)
    order = []
    while env.remote.pending():
        call = env.remote.pending()[0]
        order.append(call.domain)
        call.answer()
    assert order == ["c.example", "a.example", "b.example"]


def test_thousands_of_deferred_messages_cost_one_timer(tmp_path):
    settings = QueueSettings(retry=(100.0,), concurrency=500, per_domain=500)
    env = Env(tmp_path, settings=settings).start()
    for n in range(300):
        env.accept([f"u{n}@remote.example"], qid=f"{n:024x}")
        env.clock.advance(0.5)
    env.remote.answer_all(451, "4.3.0 later")
    assert len(env.clock.getDelayedCalls()) == 1
    assert len(env.runner.wakeups) == 300


def test_a_5xx_fails_the_recipient_and_one_dsn_reaches_the_local_sender(tmp_path):
    env = Env(tmp_path).start()
    with capture_events() as seen:
        qid = env.accept(["a@remote.example", "b@remote.example", "c@other.example"])
        by_domain = {c.domain: c for c in env.remote.pending()}
        by_domain["remote.example"].answer(per_recipient={
            "a@remote.example": (550, "5.1.1 <a@remote.example>: no such user"),
            "b@remote.example": (554, "5.7.1 rejected")})
        [dsn] = env.parsed("alice")             # at once, while c@other.example is open
        by_domain["other.example"].answer(250, "2.0.0 ok")
    assert len(env.mails("alice")) == 1
    assert dsn["Return-Path"] == "<>"
    assert dsn["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert dsn["To"] == "<alice@example.test>" and dsn["Auto-Submitted"] == "auto-replied"
    assert dsn["In-Reply-To"] == "<m1@example.test>"
    per_message, first, second = dsn_fields(dsn)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["Arrival-Date"] == "Thu, 01 Jan 1970 00:16:40 +0000"
    assert first == {"Final-Recipient": "rfc822; a@remote.example", "Action": "failed",
                     "Status": "5.1.1", "Remote-MTA": "dns; mx.remote.example",
                     "Diagnostic-Code": "smtp; 550 5.1.1 <a@remote.example>: no such user",
                     "Last-Attempt-Date": "Thu, 01 Jan 1970 00:16:40 +0000"}
    assert (second["Final-Recipient"], second["Status"]) == ("rfc822; b@remote.example",
                                                              "5.7.1")
    headers = dsn.get_payload()[2].get_payload()
    assert "Subject: hello there" in headers and "body" not in headers
    assert env.spool.get(qid) is None and env.spool.queue_ids() == []
    [sent] = seen.named("bounce.sent")
    assert (sent["queue_id"], sent["kind"], sent["to"], sent["recipients"]) == (
        qid, "failed", "alice@example.test", ["a@remote.example", "b@remote.example"])
    assert [e["status"] for e in seen.named("delivery.failed")] == ["5.1.1", "5.7.1"]


def test_failures_of_separate_passes_get_separate_dsns(tmp_path):
    env = Env(tmp_path).start()
    env.accept(["a@one.example", "b@two.example"])
    first, second = env.remote.pending()
    first.answer(550, "5.1.1 unknown")
    assert len(env.mails("alice")) == 1
    second.answer(550, "5.1.1 unknown")
    assert len(env.mails("alice")) == 2
    assert sorted(dsn_fields(m)[1]["Final-Recipient"] for m in env.parsed("alice")) == [
        "rfc822; a@one.example", "rfc822; b@two.example"]
    assert all(len(dsn_fields(m)) == 2 for m in env.parsed("alice"))


def test_max_age_expiry_fails_with_4_4_7_and_bounces(tmp_path):
    settings = QueueSettings(retry=(1000.0,), max_age=2500.0)
    env = Env(tmp_path, settings=settings).start()
    with capture_events() as seen:
        qid = env.accept(["a@remote.example"])
        nexts = []
        for _ in range(10):
            if not env.remote.pending():
                break
            env.remote.pending()[0].answer(451, "4.4.1 connection timed out")
            if env.spool.get(qid) is None:
                break
            nexts.append(env.state(qid, "a@remote.example")["next_attempt"])
            env.clock.advance(nexts[-1] - env.clock.seconds())
    assert nexts == [2000.0, 3000.0, 3500.0]      # the last attempt is at max_age exactly
    assert env.spool.get(qid) is None
    [dsn] = env.parsed("alice")
    block = dsn_fields(dsn)[1]
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert "4.4.1 connection timed out" in block["Diagnostic-Code"]
    [expired] = seen.named("queue.expired")
    assert (expired["queue_id"], expired["age"]) == (qid, 2500.0)


def test_null_mx_routing_error_is_a_5_1_10_bounce_and_servfail_defers(tmp_path):
    class RoutingRemote(FakeRemote):
        def deliver(self, envelope, message, recipients, domain, kind=REMOTE):
            self.calls.append(domain)
            if domain == "nullmx.example":
                return defer.fail(RoutingError(True, "5.1.10",
                                               "Domain nullmx.example does not accept mail"))
            return defer.fail(RoutingError(False, "4.4.3", "SERVFAIL for broken.example"))

    env = Env(tmp_path, remote=RoutingRemote()).start()
    qid = env.accept(["a@nullmx.example", "b@broken.example"])
    broken = env.state(qid, "b@broken.example")
    assert (broken["state"], broken["status"]) == (DEFERRED, "4.4.3")
    assert broken["last_error"] == "4.4.3 SERVFAIL for broken.example"
    [dsn] = env.parsed("alice")
    block = dsn_fields(dsn)[1]
    assert (block["Final-Recipient"], block["Status"]) == ("rfc822; a@nullmx.example",
                                                            "5.1.10")
    assert " ".join(block["Diagnostic-Code"].split()) == (
        "X-Mailappliance; 5.1.10 Domain nullmx.example does not accept mail")
    assert "Remote-MTA" not in block


def test_results_from_our_own_side_are_not_quoted_as_smtp(tmp_path):
    env = Env(tmp_path).start()
    qid = env.accept(["a@remote.example"])
    call = env.remote.pending()[0]
    call.d.callback([RecipientResult("a@remote.example", 451, "4.4.1",
                                     "connect to mx[192.0.2.1]:25: Connection refused",
                                     from_remote=False)])
    state = env.state(qid, "a@remote.example")
    assert state["last_error"] == "4.4.1 connect to mx[192.0.2.1]:25: Connection refused"
    assert state["diagnostic"] == "" and state["state"] == DEFERRED


def test_a_null_sender_message_is_never_bounced(tmp_path):
    env = Env(tmp_path).start()
    with capture_events() as seen:
        qid = env.accept(["a@remote.example"], sender="", listener="mx")
        env.remote.pending()[0].answer(550, "5.1.1 unknown")
    assert env.spool.queue_ids() == [] and env.mails("alice") == []
    assert env.mails("postmaster") == []
    [dropped] = seen.named("bounce.dropped")
    assert dropped["queue_id"] == qid and dropped["recipients"] == ["a@remote.example"]
    assert seen.named("bounce.sent") == []


def test_a_failed_bounce_goes_to_the_postmaster_and_a_failed_postmaster_copy_is_dropped(
        tmp_path):
    env = Env(tmp_path).start()
    with capture_events() as seen:
        env.accept(["a@remote.example"], sender="carol@far.example")
        env.remote.pending()[0].answer(550, "5.1.1 unknown")
        [bounce] = env.remote.pending()                  # the DSN to carol, remote too
        assert bounce.envelope.sender == "" and bounce.recipients == ["carol@far.example"]
        assert bounce.envelope.listener == BOUNCE_LISTENER
        bounce.answer(550, "5.1.1 carol is gone")
    [notice] = env.parsed("postmaster")
    assert notice["Subject"].startswith("Postmaster Copy")
    assert dsn_fields(notice)[1]["Final-Recipient"] == "rfc822; carol@far.example"
    assert [e["kind"] for e in seen.named("bounce.sent")] == ["failed", "postmaster"]
    assert env.spool.queue_ids() == []

    # Without a postmaster mailbox the copy fails locally and is dropped: no loop.
    env2 = Env(tmp_path / "second", users={"alice@example.test": ["alice@example.test"]})
    env2.start()
    with capture_events() as seen:
        env2.accept(["a@remote.example"], sender="carol@far.example")
        env2.remote.pending()[0].answer(550, "5.1.1 unknown")
        env2.remote.pending()[0].answer(550, "5.1.1 carol is gone")
    assert [e["kind"] for e in seen.named("bounce.sent")] == ["failed", "postmaster"]
    [dropped] = seen.named("bounce.dropped")
    assert dropped["recipients"] == ["postmaster@example.test"]
    assert env2.spool.queue_ids() == [] and env2.remote.pending() == []


def test_one_delay_warning_after_delay_warning(tmp_path):
    settings = QueueSettings(retry=(700.0,), max_age=86400.0, delay_warning=3600.0)
    env = Env(tmp_path, settings=settings).start()
    with capture_events() as seen:
        qid = env.accept(["a@remote.example"])       # at 1000: the warning is due at 4600
        for _ in range(5):                           # attempts at 1000, 1700 ... 3800
            env.remote.answer_all(451, "4.2.0 mailbox busy")
            env.clock.advance(700)
        env.remote.answer_all(451, "4.2.0 mailbox busy")     # at 4500
        env.clock.advance(99)
        assert env.mails("alice") == []
        env.clock.advance(1)                          # 4600: between two attempts
        assert len(env.mails("alice")) == 1 and env.remote.pending() == []
        for _ in range(20):
            env.clock.advance(700)
            env.remote.answer_all(451, "4.2.0 mailbox busy")
    assert env.spool.get(qid).flags["delay_warned"] is True
    [warning] = env.parsed("alice")
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    block = dsn_fields(warning)[1]
    assert (block["Action"], block["Status"]) == ("delayed", "4.2.0")
    assert block["Will-Retry-Until"] == "Fri, 02 Jan 1970 00:16:40 +0000"
    [sent] = seen.named("bounce.sent")
    assert sent["kind"] == "delayed" and sent["recipients"] == ["a@remote.example"]
    # A restart does not warn again: the flag is in the state file.
    env.runner.stopService()
    restarted = Env(tmp_path, clock=env.clock, settings=settings).start()
    restarted.clock.advance(700)
    restarted.remote.answer_all(451, "4.2.0 mailbox busy")
    assert len(restarted.mails("alice")) == 1


def test_no_delay_warning_when_disabled_or_for_null_senders(tmp_path):
    settings = QueueSettings(retry=(600.0,), max_age=86400.0, delay_warning=0.0)
    env = Env(tmp_path, settings=settings).start()
    env.accept(["a@remote.example"])
    env2 = Env(tmp_path / "b", settings=QueueSettings(retry=(600.0,), delay_warning=60.0))
    env2.start()
    env2.accept(["a@remote.example"], sender="", listener="mx")
    for _ in range(10):
        for e in (env, env2):
            e.remote.answer_all(451, "4.2.0 busy")
            e.clock.advance(600)
    assert env.mails("alice") == [] and env2.mails("alice") == []
    assert env2.mails("postmaster") == []


def test_an_alias_forwarding_off_the_box_delivers_locally_and_remotely(tmp_path):
    env = Env(tmp_path).start()
    qid = env.accept(["fwd@example.test"])
    assert len(env.mails("bob")) == 1
    [call] = env.remote.pending()
    assert call.recipients == ["x@remote.example"]
    assert env.state(qid, "fwd@example.test")["state"] == DELIVERED
    assert env.state(qid, "x@remote.example")["original"] == "fwd@example.test"
    call.answer(550, "5.1.1 gone")
    block = dsn_fields(env.parsed("alice")[0])[1]
    # Issue 17: the sender sees the alias it wrote, never where it leads.
    assert "Original-Recipient" not in block and "Remote-MTA" not in block
    assert block["Final-Recipient"] == "rfc822; fwd@example.test"
    assert b"x@remote.example" not in env.mails("alice")[0].read_bytes()
    assert env.spool.queue_ids() == [] and len(env.mails("bob")) == 1


def test_a_restart_resumes_without_resending_to_accepted_recipients(tmp_path):
    first = Env(tmp_path).start()
    qid = first.accept(["a@one.example", "b@two.example", "c@three.example"])
    calls = {c.domain: c for c in first.remote.pending()}
    calls["one.example"].answer(250, "2.0.0 queued as 1")
    calls["two.example"].answer(451, "4.3.0 later")
    # c@three.example is in flight when the process dies: nothing recorded.
    first.runner.stopService()
    assert calls["three.example"].d.called        # cancelled, not answered

    second = Env(tmp_path, clock=first.clock)
    with capture_events() as seen:
        second.start()
    assert seen.named("queue.recovered")[0]["count"] == 1
    assert [c.recipients for c in second.remote.pending()] == [["c@three.example"]]
    second.remote.answer_all()
    second.clock.advance(60)
    assert [c.recipients for c in second.remote.pending()] == [["b@two.example"]]
    second.remote.answer_all()
    assert second.spool.get(qid) is None
    tried = [r for c in first.remote.calls + second.remote.calls for r in c.recipients]
    assert tried.count("a@one.example") == 1


def test_hold_stops_delivery_until_release(tmp_path):
    env = Env(tmp_path).start()
    with capture_events() as seen:
        qid = env.accept(["a@remote.example"])
        env.remote.pending()[0].answer(451, "4.3.0 later")
        env.runner.hold(qid)
        env.clock.advance(3600)
        assert env.remote.pending() == []
        assert env.runner.list()[0]["held"] is True
        assert env.spool.get(qid).flags["held"] is True
        env.runner.release(qid)
    assert len(env.remote.pending()) == 1            # overdue: attempted at once
    assert [e["event"] for e in seen.records if e["event"].startswith("queue.")
            and e["event"] not in ("queue.deferred",)] == ["queue.held", "queue.released"]


def test_hold_survives_a_restart_and_a_waiting_job_of_a_held_message_is_skipped(tmp_path):
    env = Env(tmp_path, settings=QueueSettings(concurrency=1)).start()
    first = env.accept(["a@one.example"])
    second = env.accept(["b@two.example"])       # waits for the single slot
    env.runner.hold(second)
    env.remote.pending()[0].answer()
    assert [c.domain for c in env.remote.calls] == ["one.example"]
    assert env.spool.get(first) is None
    env.runner.stopService()
    restarted = Env(tmp_path, clock=env.clock).start()
    assert restarted.spool.get(second).held and restarted.remote.calls == []


def test_retry_now_and_delete(tmp_path):
    env = Env(tmp_path).start()
    with capture_events() as seen:
        one = env.accept(["a@one.example"])
        two = env.accept(["b@two.example"])
        env.remote.answer_all(451, "4.3.0 later")
        assert env.runner.retry(one) == 1
        assert [c.domain for c in env.remote.pending()] == ["one.example"]
        env.remote.answer_all(451, "4.3.0 later")
        assert env.runner.retry() == 2
        assert sorted(c.domain for c in env.remote.pending()) == ["one.example",
                                                                  "two.example"]
        env.remote.answer_all(451, "4.3.0 later")
        env.runner.delete(two)
    assert env.spool.queue_ids() == [one] and env.mails("alice") == []
    assert seen.named("queue.deleted")[0]["queue_id"] == two
    assert [e["count"] for e in seen.named("queue.retried")] == [1, 2]
    env.clock.advance(10**5)
    assert {c.domain for c in env.remote.pending()} == {"one.example"}


def test_delete_while_a_delivery_runs_writes_nothing_back(tmp_path):
    env = Env(tmp_path).start()
    qid = env.accept(["a@remote.example"])
    env.runner.delete(qid)
    env.remote.pending()[0].answer(550, "5.1.1 unknown")
    assert env.spool.queue_ids() == [] and env.mails("alice") == []
    assert os.listdir(tmp_path / "queue") == []


def test_admin_errors_for_unknown_ids_are_one_line(tmp_path):
    env = Env(tmp_path).start()
    for action in (env.runner.hold, env.runner.release, env.runner.delete,
                   env.runner.show):
        failures = []
        action("00ff00ff00ff00ff00ff").addErrback(failures.append)
        assert failures[0].check(QueueError)
        assert "\n" not in str(failures[0].value)
    with pytest.raises(QueueError):
        env.runner.retry("../../etc/passwd")


def test_list_and_show(tmp_path):
    env = Env(tmp_path).start()
    qid = env.accept(["a@remote.example", "bob@example.test"])
    env.remote.pending()[0].answer(421, "4.7.0 greylisted")
    env.clock.advance(30)
    [row] = env.runner.list()
    assert (row["queue_id"], row["sender"], row["size"], row["age"], row["held"]) == (
        qid, "alice@example.test", len(MESSAGE), 30.0, False)
    assert row["last_error"] == "host mx.remote.example said: 421 4.7.0 greylisted"
    assert [(r["address"], r["state"], r["attempts"]) for r in row["recipients"]] == [
        ("a@remote.example", DEFERRED, 1), ("bob@example.test", DELIVERED, 1)]
    shown = []
    env.runner.show(qid).addCallback(shown.append)
    assert "Subject: hello there" in shown[0]["headers"] and "body" not in shown[0]["headers"]
    assert shown[0]["envelope"]["listener"] == "submission"
    assert shown[0]["states"]["a@remote.example"]["remote_host"] == "mx.remote.example"


def test_without_remote_delivery_outbound_recipients_still_wait(tmp_path):
    env = Env(tmp_path)
    env.runner = QueueRunner(env.spool, env.directory,
                             MaildirDeliverer(str(tmp_path / "mail"), env.writer, HOST),
                             env.clock)
    env.start()
    qid = env.accept(["a@remote.example"])
    state = env.state(qid, "a@remote.example")
    assert state["state"] == DEFERRED and state["next_attempt"] is None
    # Then with remote delivery (a restart with the feature on), it goes out.
    env.runner.stopService()
    env2 = Env(tmp_path, clock=env.clock).start()
    assert [c.recipients for c in env2.remote.pending()] == [["a@remote.example"]]


def test_stop_cancels_outbound_work_and_leaves_no_timer(tmp_path):
    env = Env(tmp_path, settings=QueueSettings(concurrency=1)).start()
    env.accept(["a@one.example"])
    env.accept(["b@two.example"])
    d = env.runner.stopService()
    assert d.called
    assert env.clock.getDelayedCalls() == []
    assert [c.d.called for c in env.remote.calls] == [True]
    assert env.runner.outbound.waiting == 0 or env.runner.outbound.stopped


def test_settings_from_config():
    cfg = make_config(queue={"retry": "1m, 10m", "max_age": "2d", "delay_warning": "0",
                             "concurrency": "7", "per_domain": "3"})
    settings = QueueSettings.from_config(cfg)
    assert (settings.retry, settings.max_age, settings.delay_warning, settings.concurrency,
            settings.per_domain) == ((60.0, 600.0), 172800.0, 0.0, 7, 3)
    assert 0 < settings.jitter <= 0.2


# -- the scheduling parts on their own

def test_wakeup_schedule_uses_one_timer_and_the_latest_setting():
    clock = task.Clock()
    woken = []
    schedule = WakeupSchedule(clock, woken.append)
    schedule.at("a", 30)
    schedule.at("b", 10)
    schedule.at("c", 20)
    schedule.at("b", 40)                 # replaces 10
    schedule.cancel("c")
    assert len(clock.getDelayedCalls()) == 1 and len(schedule) == 2
    clock.advance(29)
    assert woken == []
    clock.advance(1)
    assert woken == ["a"]
    clock.advance(10)
    assert woken == ["a", "b"] and clock.getDelayedCalls() == [] and len(schedule) == 0


def test_wakeup_schedule_compacts_superseded_items():
    clock = task.Clock()
    schedule = WakeupSchedule(clock, lambda key: None)
    for n in range(10000):
        schedule.at("same", 1000 - n % 7)
    assert len(schedule._heap) < 100 and schedule.when("same") == 1000 - 9999 % 7


def test_dispatcher_caps_cancel_and_stop():
    dispatcher = Dispatcher(concurrency=2, per_key=1)
    started, results = [], []

    def work(name):
        def run():
            d = defer.Deferred()
            started.append((name, d))
            return d
        return run
    for name, key in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")):
        dispatcher.submit(key, work(name)).addBoth(results.append)
    assert [n for n, _ in started] == ["a1", "b1"]
    started[0][1].callback("done a1")
    assert [n for n, _ in started] == ["a1", "b1", "c1"]     # a's turn comes after c's
    assert results == ["done a1"]
    dispatcher.stop()
    assert len(results) == 4 and all(
        isinstance(r, Failure) for r in results[1:])
    assert dispatcher.active == 0
