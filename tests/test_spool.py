"""The spool: commit protocol, storage errors, state updates, recovery, crash safety."""

import errno
import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from appliance import events
from appliance.envelope import Envelope
from appliance.queue.commit import FileSystem, GroupCommitWriter, synchronous_runner
from appliance.queue.store import DEFERRED, DELIVERED, PENDING, Spool, StorageError

QID = "0005f1e2d3c4b5a6deadbeef"
MESSAGE = b"Received: from a\r\nSubject: hi\r\n\r\nbody\r\n"


class Crash(BaseException):
    """A simulated kill -9: nothing after it runs, not even cleanup."""


class FaultyFS(FileSystem):
    """Raises ``error`` at the ``at``-th mutating call (0-based) and every call after."""

    MUTATING = ("open_new", "write_all", "fsync", "close", "rename", "unlink", "fsync_dir",
                "mkdir")

    def __init__(self, at=None, error=None, only=None):
        self.at, self.error, self.only = at, error, only
        self.count = 0
        self.crashed = False

    def __getattribute__(self, name):
        method = super().__getattribute__(name)
        if name not in FaultyFS.MUTATING:
            return method

        def wrapped(*args):
            self._step(name)
            return method(*args)
        return wrapped

    def _step(self, name):
        if self.crashed:
            raise Crash()
        if self.only is not None and name != self.only:
            return
        if self.at is not None and self.count == self.at:
            if self.error is None:
                self.crashed = True
                raise Crash()
            raise OSError(self.error, os.strerror(self.error))
        self.count += 1


def envelope(qid=QID, recipients=("bob@example.test",), sender="alice@example.org"):
    return Envelope(queue_id=qid, sender=sender, recipients=list(recipients),
                    received_at=1000.0, helo="client.example.org", peer_ip="192.0.2.1",
                    size=len(MESSAGE))


def make_spool(directory, fs=None, clock=None, runner=synchronous_runner, statvfs=os.statvfs):
    writer = GroupCommitWriter(runner, fs)
    return Spool(str(directory), writer, synchronous_runner, clock or task.Clock(),
                 statvfs=statvfs)


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


@pytest.fixture
def collected():
    collector = events.EventCollector()
    events.add_observer(collector)
    yield collector
    events.remove_observer(collector)


def test_accept_commits_message_and_readable_state(tmp_path):
    queue = tmp_path / "queue"
    spool = make_spool(queue)
    notified = []
    spool.add_listener(notified.append)
    assert result_of(spool.accept(envelope(), MESSAGE)) == QID
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]
    assert (queue / (QID + ".msg")).read_bytes() == MESSAGE
    state = json.loads((queue / (QID + ".json")).read_text())
    assert state["envelope"]["sender"] == "alice@example.org"
    assert state["message_size"] == len(MESSAGE)
    assert state["recipients"]["bob@example.test"]["state"] == PENDING
    assert notified == [QID]
    assert spool.get(QID).envelope.recipients == ["bob@example.test"]


def test_accept_fires_only_after_the_batch_is_durable(tmp_path):
    held = []

    def hold(f, *args):
        held.append((f, args, defer.Deferred()))
        return held[-1][2]

    spool = make_spool(tmp_path / "queue", runner=hold)
    d = spool.accept(envelope(), MESSAGE)
    assert not d.called and not (tmp_path / "queue").exists()
    f, args, batch = held.pop()
    batch.callback(f(*args))        # the writer thread runs the whole batch, then...
    assert result_of(d) == QID      # ...only then is the client told
    assert sorted(os.listdir(tmp_path / "queue")) == [QID + ".json", QID + ".msg"]


def test_accept_assigns_a_queue_id_when_missing(tmp_path):
    spool = make_spool(tmp_path / "queue")
    qid = result_of(spool.accept(envelope(qid=""), MESSAGE))
    assert len(qid) == 22 and spool.get(qid) is not None


def test_accept_refuses_unsafe_queue_ids(tmp_path):
    spool = make_spool(tmp_path / "queue")
    failure = result_of(spool.accept(envelope(qid="../../etc/passwd"), MESSAGE))
    assert failure.check(ValueError)
    assert not (tmp_path / "queue").exists()


@pytest.mark.parametrize("only,code", [("write_all", errno.ENOSPC), ("fsync", errno.EIO),
                                       ("rename", errno.EIO), ("fsync_dir", errno.EIO)])
def test_storage_error_means_no_accept_and_no_committed_entry(tmp_path, collected, only, code):
    queue = tmp_path / "queue"
    spool = make_spool(queue, fs=FaultyFS(at=0, error=code, only=only))
    notified = []
    spool.add_listener(notified.append)
    failure = result_of(spool.accept(envelope(), MESSAGE))
    assert failure.check(StorageError)
    assert os.strerror(code) in failure.value.error
    assert os.listdir(queue) == []          # no message, no state file, no temp file
    assert spool.get(QID) is None and notified == []
    [event] = collected.named("spool.error")
    assert event["operation"] == "accept"
    assert result_of(make_spool(queue).recover()) == []


def test_space_available_keeps_a_margin(tmp_path):
    def statvfs(free):
        return lambda path: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096,
                                            f_files=1000, f_favail=1000)
    mib = 1024 * 1024
    assert make_spool(tmp_path, statvfs=statvfs(100 * mib)).space_available(10 * mib)
    assert not make_spool(tmp_path, statvfs=statvfs(30 * mib)).space_available(10 * mib)


def test_space_available_is_false_when_out_of_inodes_or_statvfs_fails(tmp_path, collected):
    no_inodes = lambda path: SimpleNamespace(f_bavail=10**9, f_frsize=4096,  # noqa: E731
                                             f_files=1000, f_favail=3)
    assert not make_spool(tmp_path, statvfs=no_inodes).space_available(100)

    def broken(path):
        raise OSError(errno.EIO, "I/O error")
    assert not make_spool(tmp_path, statvfs=broken).space_available(100)
    assert collected.named("spool.error")[0]["operation"] == "statvfs"


def test_space_available_works_before_the_queue_directory_exists(tmp_path):
    assert make_spool(tmp_path / "queue").space_available(1000)


def test_update_replaces_the_state_file_atomically(tmp_path):
    queue = tmp_path / "queue"
    clock = task.Clock()
    spool = make_spool(queue, clock=clock)
    result_of(spool.accept(envelope(recipients=("a@example.test", "b@example.test")), MESSAGE))
    clock.advance(5)
    result_of(spool.update(QID, {"a@example.test": {"state": DELIVERED}}))
    result_of(spool.update(QID, {"b@example.test": {"state": DEFERRED, "last_error": "x"}}))
    state = json.loads((queue / (QID + ".json")).read_text())
    assert state["recipients"]["a@example.test"]["state"] == DELIVERED
    assert state["recipients"]["a@example.test"]["updated_at"] == 5
    assert state["recipients"]["b@example.test"]["last_error"] == "x"
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]


def test_failed_update_keeps_the_old_state_file(tmp_path):
    queue = tmp_path / "queue"
    result_of(make_spool(queue).accept(envelope(), MESSAGE))
    spool = make_spool(queue, fs=FaultyFS(at=0, error=errno.ENOSPC, only="write_all"))
    result_of(spool.recover())
    assert result_of(spool.update(QID, {"bob@example.test": {"state": DELIVERED}})).check(
        StorageError)
    state = json.loads((queue / (QID + ".json")).read_text())
    assert state["recipients"]["bob@example.test"]["state"] == PENDING
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]


def test_remove_deletes_both_files(tmp_path, collected):
    queue = tmp_path / "queue"
    spool = make_spool(queue)
    result_of(spool.accept(envelope(), MESSAGE))
    assert result_of(spool.remove(QID)) == QID
    assert os.listdir(queue) == [] and spool.get(QID) is None
    assert collected.named("queue.removed") == [
        {"ts": collected.named("queue.removed")[0]["ts"], "event": "queue.removed",
         "queue_id": QID}]
    assert result_of(spool.update(QID, {})).check(KeyError)


def test_read_returns_the_message_and_storage_error_when_gone(tmp_path):
    queue = tmp_path / "queue"
    spool = make_spool(queue)
    result_of(spool.accept(envelope(), MESSAGE))
    assert result_of(spool.read(QID)) == MESSAGE
    os.unlink(queue / (QID + ".msg"))
    assert result_of(spool.read(QID)).check(StorageError)


def test_entries_lists_what_the_admin_shell_shows(tmp_path):
    clock = task.Clock()
    clock.advance(1060)
    spool = make_spool(tmp_path / "queue", clock=clock)
    result_of(spool.accept(envelope(), MESSAGE))
    result_of(spool.update(QID, {"bob@example.test": {"state": DEFERRED,
                                                      "last_error": "remote later"}}))
    [entry] = spool.entries()
    assert entry["queue_id"] == QID and entry["sender"] == "alice@example.org"
    assert entry["size"] == len(MESSAGE) and entry["age"] == 60.0
    assert entry["last_error"] == "remote later"
    assert entry["recipients"][0]["state"] == DEFERRED


def test_recover_deletes_orphans_and_sets_corrupt_entries_aside(tmp_path, collected):
    queue = tmp_path / "queue"
    result_of(make_spool(queue).accept(envelope(), MESSAGE))
    other = "0005f1e2d3c4b5a6cafef00d"
    result_of(make_spool(queue).accept(envelope(qid=other), MESSAGE))
    (queue / "0005f1e2d3c4b5a6aaaaaaaa.msg").write_bytes(b"half a mess")   # no state file
    (queue / (QID + ".json.3.tmp")).write_bytes(b"{")                      # a torn update
    with open(queue / (other + ".msg"), "ab") as f:                        # wrong size
        f.write(b"extra")
    spool = make_spool(queue)
    [entry] = result_of(spool.recover())
    assert entry.queue_id == QID and entry.envelope.sender == "alice@example.org"
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg", "corrupt"]
    assert sorted(os.listdir(queue / "corrupt")) == [other + ".json", other + ".msg"]
    assert collected.named("spool.orphans_removed")[0]["count"] == 2
    assert collected.named("spool.corrupt")[0]["queue_id"] == other
    assert result_of(spool.recover()) == []        # known entries are not returned twice


def test_recover_sets_aside_unparsable_state(tmp_path):
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / (QID + ".json")).write_bytes(b"not json")
    (queue / (QID + ".msg")).write_bytes(MESSAGE)
    assert result_of(make_spool(queue).recover()) == []
    assert sorted(os.listdir(queue / "corrupt")) == [QID + ".json", QID + ".msg"]


def test_a_kill_at_any_step_of_accept_leaves_nothing_or_a_complete_entry(tmp_path):
    """Kill the commit protocol before each system call in turn, then recover."""
    outcomes = set()
    for step in range(50):
        queue = tmp_path / f"run{step}" / "queue"
        fs = FaultyFS(at=step)
        accepted = result_of(make_spool(queue, fs=fs).accept(envelope(), MESSAGE))
        spool = make_spool(queue)
        recovered = result_of(spool.recover())
        files = sorted(os.listdir(queue))
        if recovered:
            assert files == [QID + ".json", QID + ".msg"]
            assert result_of(spool.read(QID)) == MESSAGE
            outcomes.add("complete")
        else:
            assert files == [] and accepted != QID
            outcomes.add("none")
        if not fs.crashed:
            assert accepted == QID and recovered
            break
    else:
        pytest.fail("accept never completed")
    assert outcomes == {"none", "complete"}
    assert step >= 8       # mkdir, 2 opens, 2 writes, 2 fsyncs, 2 closes, rename, dir fsync
