"""The queue runner: local delivery, aliases, failures, retries, recovery, crash safety."""

import errno
import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from appliance.deliver.local import REMOTE_NOT_AVAILABLE, USER_UNKNOWN
from appliance.deliver.maildir import MaildirDeliverer
from appliance.maildir import maildir_bytes
from appliance.envelope import Envelope
from appliance.durable.commit import FileSystem, GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.queue.runner import QueueRunner
from appliance.envelope import DEFERRED, DELIVERED, FAILED
from appliance.queue.store import Spool
from appliance.testing import FaultyFS

MESSAGE = b"Received: from a\r\nSubject: hi\r\n\r\nbody\r\n"
STORED = maildir_bytes("alice@example.org", MESSAGE)


class FakeDirectory:
    """Users, aliases (expanded recursively) and forwards, like appliance.directory."""

    def __init__(self, users=("bob@example.test", "carol@example.test"), aliases=None,
                 domains=("example.test",), asynchronous=False):
        self.users, self.domains = set(users), set(domains)
        self.aliases = aliases or {"team@example.test": ["bob@example.test",
                                                         "carol@example.test"]}
        self.asynchronous = asynchronous
        self.error = None

    def is_local_domain(self, domain):
        return domain in self.domains

    def resolve(self, address):
        if self.error is not None:
            raise self.error
        found = self._expand(address)
        return defer.succeed(found) if self.asynchronous else found

    def _expand(self, address):
        if address in self.aliases:
            return [t for target in self.aliases[address] for t in self._expand(target)]
        if address in self.users or not self.is_local_domain(address.rpartition("@")[2]):
            return [address]
        return []


def build(root, directory=None, fs=None, runner=synchronous_runner, clock=None, spare=False):
    clock = clock or task.Clock()
    clock.advance(1000)
    writer = GroupCommitWriter(runner, fs)
    spool = Spool(str(root / "queue"), writer, synchronous_runner, clock,
                  spare=str(root / "queue.spare") if spare else None)
    maildir = MaildirDeliverer(str(root / "mail"), writer, "mx.example.test")
    directory = directory or FakeDirectory()
    return SimpleNamespace(clock=clock, writer=writer, spool=spool, directory=directory,
                           runner=QueueRunner(spool, directory, maildir, clock))


def accept(env, recipients, qid="0005f1e2d3c4b5a6deadbeef"):
    envelope = Envelope(queue_id=qid, sender="alice@example.org", recipients=list(recipients),
                        received_at=990.0)
    out = []
    env.runner.accept(envelope, MESSAGE).addBoth(out.append)
    return out[0]


def mail_files(root, user):
    box = root / "mail" / "example.test" / user
    return [box / sub / name for sub in ("new", "cur") if (box / sub).exists()
            for name in os.listdir(box / sub)]


def state_file(root, qid="0005f1e2d3c4b5a6deadbeef"):
    return json.loads((root / "queue" / (qid + ".json")).read_text())


def test_an_accepted_message_is_delivered_then_removed(tmp_path, collected):
    env = build(tmp_path)
    env.runner.startService()
    assert accept(env, ["bob@example.test"]) == "0005f1e2d3c4b5a6deadbeef"
    [path] = mail_files(tmp_path, "bob")
    assert path.read_bytes() == STORED
    assert os.listdir(tmp_path / "queue") == [] and env.spool.entries() == []
    [event] = collected.named("delivery.local")
    assert (event["recipient"], event["mailbox"], event["size"], event["delay"]) == (
        "bob@example.test", "bob@example.test", len(STORED), 10.0)
    assert collected.named("queue.removed")[0]["queue_id"] == "0005f1e2d3c4b5a6deadbeef"
    assert collected.named("queue.recovered")[0]["count"] == 0


def test_a_user_reached_twice_via_aliases_gets_one_copy(tmp_path, collected):
    env = build(tmp_path, FakeDirectory(asynchronous=True))
    env.runner.startService()
    accept(env, ["bob@example.test", "team@example.test"])
    assert len(mail_files(tmp_path, "bob")) == 1
    assert len(mail_files(tmp_path, "carol")) == 1
    assert sorted(e["mailbox"] for e in collected.named("delivery.local")) == [
        "bob@example.test", "carol@example.test"]
    assert env.spool.entries() == []


def test_unknown_recipient_fails_and_the_entry_stays_for_bounces(tmp_path, collected):
    env = build(tmp_path)
    env.runner.startService()
    accept(env, ["bob@example.test", "gone@example.test"])
    assert len(mail_files(tmp_path, "bob")) == 1
    recipients = state_file(tmp_path)["recipients"]
    assert recipients["gone@example.test"]["state"] == FAILED
    assert recipients["gone@example.test"]["last_error"] == USER_UNKNOWN
    assert recipients["bob@example.test"]["state"] == DELIVERED
    assert collected.named("delivery.local.failed")[0]["reason"] == USER_UNKNOWN
    assert env.clock.getDelayedCalls() == []


def test_non_local_targets_wait_deferred_for_the_outbound_queue(tmp_path):
    directory = FakeDirectory(aliases={"fwd@example.test": ["bob@example.test",
                                                            "x@remote.example"]})
    env = build(tmp_path, directory)
    env.runner.startService()
    accept(env, ["fwd@example.test", "y@elsewhere.example"])
    assert len(mail_files(tmp_path, "bob")) == 1
    recipients = state_file(tmp_path)["recipients"]
    fwd = recipients["fwd@example.test"]
    assert (fwd["state"], fwd["last_error"], fwd["remote"], fwd["delivered_to"]) == (
        DEFERRED, REMOTE_NOT_AVAILABLE, ["x@remote.example"], ["bob@example.test"])
    assert fwd["next_attempt"] is None
    assert recipients["y@elsewhere.example"]["remote"] == ["y@elsewhere.example"]
    assert env.clock.getDelayedCalls() == []      # nothing local to retry


def test_directory_outage_defers_and_the_retry_delivers(tmp_path, collected):
    env = build(tmp_path)
    env.directory.error = ConnectionError("ldap down")
    env.runner.startService()
    accept(env, ["bob@example.test"])
    bob = state_file(tmp_path)["recipients"]["bob@example.test"]
    assert bob["state"] == DEFERRED and bob["next_attempt"] == 1060.0
    assert "ConnectionError: ldap down" in bob["last_error"]
    assert collected.named("delivery.deferred")[0]["recipient"] == "bob@example.test"
    env.directory.error = None
    env.clock.advance(59)
    assert mail_files(tmp_path, "bob") == []
    env.clock.advance(1)
    assert len(mail_files(tmp_path, "bob")) == 1
    assert env.spool.entries() == []


def test_a_broken_mailbox_is_retried_without_duplicating_the_others(tmp_path):
    env = build(tmp_path)
    env.runner.startService()
    carol = tmp_path / "mail" / "example.test" / "carol"
    carol.parent.mkdir(parents=True)
    carol.write_bytes(b"in the way")
    accept(env, ["team@example.test"])
    team = state_file(tmp_path)["recipients"]["team@example.test"]
    assert team["state"] == DEFERRED and team["delivered_to"] == ["bob@example.test"]
    assert team["attempts"] == 1
    [bob_copy] = mail_files(tmp_path, "bob")
    os.rename(bob_copy, bob_copy.parent.parent / "cur" / (bob_copy.name + ":2,S"))
    carol.unlink()
    env.clock.advance(60)
    assert len(mail_files(tmp_path, "bob")) == 1 and len(mail_files(tmp_path, "carol")) == 1
    assert env.spool.entries() == []


def test_backoff_follows_the_schedule_and_repeats_the_last_step(tmp_path):
    env = build(tmp_path)
    env.runner.retry_schedule = (10.0, 20.0)
    env.directory.error = ConnectionError("down")
    env.runner.startService()
    accept(env, ["bob@example.test"])
    times = []
    for _ in range(3):
        bob = env.spool.get("0005f1e2d3c4b5a6deadbeef").recipients["bob@example.test"]
        times.append(bob["next_attempt"] - env.clock.seconds())
        env.clock.advance(times[-1])
    assert times == [10.0, 20.0, 20.0]


def test_entries_committed_before_start_are_recovered_and_delivered(tmp_path, collected):
    first = build(tmp_path)               # its runner never starts: a crash after commit
    accept(first, ["bob@example.test"])
    accept(first, ["carol@example.test"], qid="0005f1e2d3c4b5a6cafef00d")
    assert mail_files(tmp_path, "bob") == []
    second = build(tmp_path)
    second.runner.startService()
    assert collected.named("queue.recovered")[0]["count"] == 2
    assert len(mail_files(tmp_path, "bob")) == 1 and len(mail_files(tmp_path, "carol")) == 1
    assert os.listdir(tmp_path / "queue") == []


def test_an_entry_accepted_before_the_runner_starts_is_not_forgotten(tmp_path):
    env = build(tmp_path)
    accept(env, ["bob@example.test"])
    env.runner.startService()
    assert len(mail_files(tmp_path, "bob")) == 1


def test_stop_waits_for_the_pass_in_flight_and_cancels_retries(tmp_path):
    held = []

    def hold(f, *args):
        held.append((f, args, defer.Deferred()))
        return held[-1][2]

    def run_held():
        f, args, d = held.pop(0)
        d.callback(f(*args))

    env = build(tmp_path, runner=hold)
    envelope = Envelope(queue_id="0005f1e2d3c4b5a6deadbeef", sender="alice@example.org",
                        recipients=["bob@example.test"], received_at=990.0)
    env.runner.accept(envelope, MESSAGE)          # before the runner runs: no commit links
    run_held()                                   # committed
    env.runner.startService()
    run_held()                                   # recovery; the pass's delivery is queued
    stopped = env.runner.stopService()
    assert not stopped.called
    run_held()                                   # the Maildir link
    assert not stopped.called
    run_held()                                   # the removal ends the pass
    assert stopped.called and len(mail_files(tmp_path, "bob")) == 1
    assert env.clock.getDelayedCalls() == []


def test_a_delivery_made_at_commit_leaves_nothing_for_stop_to_wait_for(tmp_path):
    held = []

    def hold(f, *args):
        held.append((f, args, defer.Deferred()))
        return held[-1][2]

    env = build(tmp_path, runner=hold)
    env.runner.startService()
    f, args, d = held.pop(0)
    d.callback(f(*args))                         # recovery
    envelope = Envelope(queue_id="0005f1e2d3c4b5a6deadbeef", sender="alice@example.org",
                        recipients=["bob@example.test"], received_at=990.0)
    accepted = env.runner.accept(envelope, MESSAGE)
    f, args, d = held.pop(0)
    d.callback(f(*args))                # committed, linked AND removed: one batch
    assert accepted.called and len(mail_files(tmp_path, "bob")) == 1
    assert os.listdir(tmp_path / "queue") == [] and env.spool.entries() == []
    assert held == [] and env.runner.stopService().called


def outcome_after_crash(root, step, read_first=False, spare=False):
    """Run accept + delivery with a kill at ``step``, restart, recover; report."""
    if spare:       # an earlier message leaves a spare state file to write over
        seed = build(root, spare=True)
        seed.runner.startService()
        # Two recipients: a one-recipient message would need no state file at all.
        accept(seed, ["bob@example.test", "carol@example.test"],
               qid="0005f1e2d3c4b5a6cafef00d")
        assert os.listdir(root / "queue.spare") == ["0005f1e2d3c4b5a6cafef00d"]
        for path in mail_files(root, "bob") + mail_files(root, "carol"):
            path.unlink()
    crashed = build(root, fs=FaultyFS(at=step), spare=spare)
    crashed.runner.startService()
    accepted = accept(crashed, ["bob@example.test", "team@example.test"])
    # Committed: the state file was renamed into place (it may be gone again if
    # the kill came during the final removal, after the delivery).
    committed = (accepted == "0005f1e2d3c4b5a6deadbeef" or
                 (root / "queue" / "0005f1e2d3c4b5a6deadbeef.json").exists())
    if read_first:
        for path in mail_files(root, "bob"):
            if path.parent.name == "new":           # a mail client reads it before the restart
                os.rename(path, path.parent.parent / "cur" / (path.name + ":2,S"))
    restarted = build(root, spare=spare)
    restarted.runner.startService()
    return accepted, committed, crashed.writer.fs.crashed, restarted


@pytest.mark.parametrize("read_first,spare", [(False, False), (True, False), (False, True)])
def test_a_kill_at_any_step_delivers_each_committed_message_exactly_once(tmp_path,
                                                                         read_first, spare):
    seen = set()
    for step in range(200):
        root = tmp_path / f"run{step}"
        accepted, committed, crashed, restarted = outcome_after_crash(root, step, read_first,
                                                                      spare)
        bob, carol = mail_files(root, "bob"), mail_files(root, "carol")
        # Committed, or delivered and retired by the commit's own batch (a kill
        # before the 250 left the client without an answer: it sends again,
        # as after any kill between the last fsync and the reply).
        if committed or bob or carol:
            assert len(bob) == 1 and len(carol) == 1, f"kill at step {step}"
            assert bob[0].read_bytes() == STORED and carol[0].read_bytes() == STORED
            seen.add("delivered" if committed else "delivered, unanswered")
        else:
            assert accepted != "0005f1e2d3c4b5a6deadbeef" and bob == [] and carol == []
            seen.add("nothing")
        assert restarted.spool.entries() == []
        assert sorted(os.listdir(root / "queue")) == []
        for user in ("bob", "carol"):
            box = root / "mail" / "example.test" / user
            assert not (box / "tmp").exists() or os.listdir(box / "tmp") == []
        if not crashed:
            break
    else:
        pytest.fail("the pipeline never completed")
    assert seen == {"delivered", "delivered, unanswered", "nothing"}
    assert step > 20          # the commit, its links and its retirement were all cut


def test_a_failed_recovery_is_retried(tmp_path, collected):
    class FailingListdir(FileSystem):
        broken = True

        def listdir(self, path):
            if self.broken:
                raise OSError(5, "Input/output error")
            return super().listdir(path)

    first = build(tmp_path)
    accept(first, ["bob@example.test"])          # committed, never delivered
    fs = FailingListdir()
    env = build(tmp_path, fs=fs)
    env.runner.startService()
    assert collected.named("spool.error")[0]["operation"] == "recover"
    assert mail_files(tmp_path, "bob") == []
    fs.broken = False
    env.clock.advance(60)
    assert collected.named("queue.recovered")[0]["count"] == 1
    assert len(mail_files(tmp_path, "bob")) == 1


def test_where_the_commit_cannot_link_the_runner_copies(tmp_path, collected):
    class NoLinks(FileSystem):
        def link(self, src, dst):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    env = build(tmp_path, fs=NoLinks())
    env.runner.startService()
    accept(env, ["bob@example.test", "team@example.test"])
    for user in ("bob", "carol"):
        [path] = mail_files(tmp_path, user)
        assert path.read_bytes() == STORED
    assert env.spool.entries() == [] and os.listdir(tmp_path / "queue") == []
    assert sorted(e["mailbox"] for e in collected.named("delivery.local")) == [
        "bob@example.test", "carol@example.test"]


def test_a_delivery_at_commit_needs_one_batch_and_no_read_back(tmp_path, collected):
    reads = []
    env = build(tmp_path)
    env.spool.reader = lambda f, *args: reads.append(args) or defer.succeed(b"")
    env.runner.startService()
    batches = env.writer.batches
    accept(env, ["bob@example.test", "team@example.test"])
    # the commit, with the links and the removal
    assert env.writer.batches - batches == 1 and reads == []
    assert os.listdir(tmp_path / "queue") == [] and env.spool.entries() == []
    assert collected.named("queue.removed")[0]["queue_id"] == "0005f1e2d3c4b5a6deadbeef"
    assert len(mail_files(tmp_path, "bob")) == 1 and len(mail_files(tmp_path, "carol")) == 1
    [bob] = mail_files(tmp_path, "bob")
    [carol] = mail_files(tmp_path, "carol")
    assert os.stat(bob).st_ino == os.stat(carol).st_ino      # one file, two names
    assert len(collected.named("delivery.local")) == 2
