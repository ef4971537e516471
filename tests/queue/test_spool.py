"""The spool: commit protocol, storage errors, state updates, recovery, crash safety."""

import errno
import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from appliance.deliver.maildir import MaildirDeliverer
from appliance.maildir import maildir_bytes
from appliance.envelope import Envelope
from appliance.durable.commit import FileSystem, GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.envelope import DEFERRED, DELIVERED, PENDING, Route
from appliance.queue.store import Spool, StorageError
from appliance.testing import Crash, FaultyFS
from appliance.testing import outcome as result_of

QID = "0005f1e2d3c4b5a6deadbeef"
MESSAGE = b"Received: from a\r\nSubject: hi\r\n\r\nbody\r\n"


def envelope(qid=QID, recipients=("bob@example.test",), sender="alice@example.org"):
    return Envelope(queue_id=qid, sender=sender, recipients=list(recipients),
                    received_at=1000.0, helo="client.example.org", peer_ip="192.0.2.1",
                    size=len(MESSAGE))


def make_spool(directory, fs=None, clock=None, runner=synchronous_runner, statvfs=os.statvfs,
               spare=None, max_spares=16):
    writer = GroupCommitWriter(runner, fs)
    return Spool(str(directory), writer, synchronous_runner, clock or task.Clock(),
                 statvfs=statvfs, spare=None if spare is None else str(spare),
                 max_spares=max_spares)


def test_accept_commits_message_and_readable_state(tmp_path):
    queue = tmp_path / "queue"
    spool = make_spool(queue)
    assert result_of(spool.accept(envelope(), MESSAGE)) == QID
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]
    # Kept in the form a Maildir stores, so local delivery is a hard link.
    stored = maildir_bytes("alice@example.org", MESSAGE)
    assert (queue / (QID + ".msg")).read_bytes() == stored
    state = json.loads((queue / (QID + ".json")).read_text())
    assert state["envelope"]["sender"] == "alice@example.org"
    assert state["message_size"] == len(MESSAGE)
    assert (state["message_form"], state["stored_size"]) == ("maildir", len(stored))
    assert state["recipients"]["bob@example.test"]["state"] == PENDING
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
    failure = result_of(spool.accept(envelope(), MESSAGE))
    assert failure.check(StorageError)
    assert os.strerror(code) in failure.value.error
    assert os.listdir(queue) == []          # no message, no state file, no temp file
    assert spool.get(QID) is None
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


def test_a_message_with_a_bare_lf_is_kept_as_received(tmp_path):
    queue = tmp_path / "queue"
    odd = b"Subject: hi\r\n\r\nbare\nlf\r\n"
    spool = make_spool(queue)
    result_of(spool.accept(envelope(), odd))
    assert (queue / (QID + ".msg")).read_bytes() == odd
    assert json.loads((queue / (QID + ".json")).read_text())["message_form"] == "wire"
    assert result_of(spool.read(QID)) == odd
    assert spool.source(QID).maildir_form is False


def test_an_entry_written_before_message_forms_existed_is_read_as_received(tmp_path):
    queue = tmp_path / "queue"
    result_of(make_spool(queue).accept(envelope(), MESSAGE))
    state = json.loads((queue / (QID + ".json")).read_text())
    del state["message_form"], state["stored_size"]
    (queue / (QID + ".json")).write_text(json.dumps(state))
    (queue / (QID + ".msg")).write_bytes(MESSAGE)
    spool = make_spool(queue)
    [entry] = result_of(spool.recover())
    assert entry.message_form == "wire" and entry.stored_size == len(MESSAGE)
    assert result_of(spool.read(QID)) == MESSAGE


def test_remove_does_not_wait_for_a_directory_fsync(tmp_path):
    class Counting(FileSystem):
        dir_syncs = 0

        def fsync_dir(self, path):
            Counting.dir_syncs += 1
            super().fsync_dir(path)

    spool = make_spool(tmp_path / "queue", fs=Counting())
    result_of(spool.accept(envelope(), MESSAGE))
    before = Counting.dir_syncs
    result_of(spool.remove(QID))
    assert Counting.dir_syncs == before and os.listdir(tmp_path / "queue") == []


def test_a_durable_remove_fsyncs_the_queue_directory(tmp_path):
    synced = []

    class Counting(FileSystem):
        def fsync_dir(self, path):
            synced.append(path)
            super().fsync_dir(path)

    queue = tmp_path / "queue"
    spool = make_spool(queue, fs=Counting(), spare=tmp_path / "spare")
    result_of(spool.accept(envelope(), MESSAGE))
    synced.clear()
    assert result_of(spool.remove(QID, durable=True)) == QID
    assert str(queue) in synced and os.listdir(queue) == []


def test_the_first_read_of_a_new_entry_comes_from_memory(tmp_path):
    queue = tmp_path / "queue"
    spool = make_spool(queue)
    result_of(spool.accept(envelope(), MESSAGE))
    os.unlink(queue / (QID + ".msg"))           # the disk is not asked
    assert result_of(spool.read(QID)) == MESSAGE
    assert result_of(spool.read(QID)).check(StorageError)     # only once


def test_memory_for_first_reads_is_bounded(tmp_path, monkeypatch):
    from appliance.queue import store
    monkeypatch.setattr(store, "HOT_BYTES", 2 * len(MESSAGE))
    spool = make_spool(tmp_path / "queue")
    qids = [f"{QID[:-1]}{n}" for n in range(4)]
    for qid in qids:
        result_of(spool.accept(envelope(qid=qid), MESSAGE))
    assert list(spool._hot) == qids[2:] and spool._hot_bytes == 2 * len(MESSAGE)
    result_of(spool.remove(qids[3]))
    assert list(spool._hot) == qids[2:3]


def test_removed_state_files_are_written_over_by_the_next_entries(tmp_path):
    queue, spare = tmp_path / "queue", tmp_path / "queue.spare"
    spool = make_spool(queue, spare=spare)
    result_of(spool.accept(envelope(), MESSAGE))
    inode = os.stat(queue / (QID + ".json")).st_ino
    result_of(spool.remove(QID))
    assert os.listdir(queue) == [] and os.listdir(spare) == [QID]
    other = "0005f1e2d3c4b5a6cafef00d"
    result_of(spool.accept(envelope(qid=other, recipients=("b@example.test",)), MESSAGE))
    assert os.listdir(spare) == []          # written over by the new entry's state file
    assert os.stat(queue / (other + ".json")).st_ino == inode
    state = json.loads((queue / (other + ".json")).read_text())
    assert state["queue_id"] == other and list(state["recipients"]) == ["b@example.test"]
    result_of(spool.update(other, {"b@example.test": {"state": DEFERRED}}))
    assert json.loads((queue / (other + ".json")).read_text())["recipients"][
        "b@example.test"]["state"] == DEFERRED


def test_spares_are_bounded_and_found_again_after_a_restart(tmp_path):
    queue, spare = tmp_path / "queue", tmp_path / "queue.spare"
    spool = make_spool(queue, spare=spare, max_spares=2)
    qids = [f"0005f1e2d3c4b5a6deadbee{i}" for i in range(3)]
    for qid in qids:
        result_of(spool.accept(envelope(qid=qid), MESSAGE))
    for qid in qids:
        result_of(spool.remove(qid))
    assert sorted(os.listdir(spare)) == qids[:2] and os.listdir(queue) == []
    restarted = make_spool(queue, spare=spare)
    assert result_of(restarted.recover()) == []
    inodes = {os.stat(spare / name).st_ino for name in os.listdir(spare)}
    other = "0005f1e2d3c4b5a6cafef00d"
    result_of(restarted.accept(envelope(qid=other), MESSAGE))
    assert len(os.listdir(spare)) == 1              # one of the two was written over
    assert os.stat(queue / (other + ".json")).st_ino in inodes
    assert result_of(restarted.read(other)) == MESSAGE


def test_a_kill_at_any_step_with_spares_leaves_nothing_or_a_complete_entry(tmp_path):
    outcomes = set()
    for step in range(50):
        queue, spare = tmp_path / f"run{step}" / "queue", tmp_path / f"run{step}" / "spare"
        seed = make_spool(queue, spare=spare)
        result_of(seed.accept(envelope(qid="0005f1e2d3c4b5a6cafef00d"), MESSAGE))
        result_of(seed.remove("0005f1e2d3c4b5a6cafef00d"))       # one spare, reused below
        fs = FaultyFS(at=step)
        crashed = make_spool(queue, fs=fs, spare=spare)
        result_of(crashed.recover())
        accepted = result_of(crashed.accept(envelope(), MESSAGE))
        spool = make_spool(queue, spare=spare)
        recovered = result_of(spool.recover())
        if recovered:
            assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]
            assert result_of(spool.read(QID)) == MESSAGE
            assert recovered[0].recipients["bob@example.test"]["state"] == PENDING
            outcomes.add("complete")
        else:
            assert os.listdir(queue) == [] and accepted != QID
            outcomes.add("none")
        if not fs.crashed:
            break
    else:
        pytest.fail("accept never completed")
    assert outcomes == {"none", "complete"}


def linking_router(root, deliverer_fs=None):
    maildir = MaildirDeliverer(str(root), None, "mx.example.test")

    def router(entry):
        mailboxes = list(entry.envelope.recipients)
        return Route({r: [r] for r in mailboxes},
                     maildir.commit_links(entry.envelope, mailboxes))
    return router


def completing(router):
    """``router`` whose routes deliver every recipient (the entry retires in its batch)."""
    return lambda entry: router(entry)._replace(complete=True)


def waiting(deferred):
    """A router that answers with ``deferred``."""
    return lambda entry: deferred


def new_files(root, user):
    new = root / "example.test" / user / "new"
    return os.listdir(new) if new.exists() else []


def test_a_router_has_the_commit_link_the_message_into_its_maildirs(tmp_path):
    queue, mail = tmp_path / "queue", tmp_path / "mail"
    spool = make_spool(queue)
    route = linking_router(mail)
    result_of(spool.accept(envelope(recipients=("bob@example.test",)), MESSAGE, router=route))
    [name] = new_files(mail, "bob")
    path = mail / "example.test" / "bob" / "new" / name
    assert os.stat(path).st_ino == os.stat(queue / (QID + ".msg")).st_ino
    entry = spool.get(QID)
    assert entry.resolved == {"bob@example.test": ["bob@example.test"]}
    assert entry.linked["bob@example.test"].path == str(path)


def test_a_complete_route_retires_the_entry_in_the_commits_batch(tmp_path, collected):
    queue, mail, spare = tmp_path / "queue", tmp_path / "mail", tmp_path / "queue.spare"
    spool = make_spool(queue, spare=spare)
    router = linking_router(mail)
    route = completing(router)
    batches = spool.writer.batches
    accepted = spool.accept(envelope(recipients=("bob@example.test",)), MESSAGE, router=route)
    assert result_of(accepted) == QID
    assert spool.writer.batches - batches == 1
    # Every link was ready: no state file at all, the Maildir is the record.
    assert os.listdir(queue) == [] and os.listdir(spare) == []
    [name] = new_files(mail, "bob")
    assert (mail / "example.test" / "bob" / "new" / name).read_bytes() == maildir_bytes(
        "alice@example.org", MESSAGE)
    entry = spool.get(QID)
    assert entry.retired                # the runner reports and forgets it
    spool.forget(QID)
    assert spool.get(QID) is None and collected.named("queue.removed")[0]["queue_id"] == QID
    assert result_of(make_spool(queue, spare=spare).recover()) == []


def test_an_entry_whose_link_failed_is_not_retired(tmp_path):
    class NoLinks(FileSystem):
        def link(self, src, dst):
            raise OSError(errno.EMLINK, os.strerror(errno.EMLINK))

    queue, mail = tmp_path / "queue", tmp_path / "mail"
    spool = make_spool(queue, fs=NoLinks())
    router = linking_router(mail)
    route = completing(router)
    result_of(spool.accept(envelope(recipients=("bob@example.test",)), MESSAGE, router=route))
    entry = spool.get(QID)
    assert not entry.retired and entry.linked["bob@example.test"].check(OSError)
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]


def killed_linking_run(tmp_path, step):
    """(queue dir, mail dir, FaultyFS, spool, linking router) of a run whose
    file system is killed at ``step``."""
    queue, mail = tmp_path / f"run{step}" / "queue", tmp_path / f"run{step}" / "mail"
    fs = FaultyFS(at=step)
    return queue, mail, fs, make_spool(queue, fs=fs), linking_router(mail)


def test_a_kill_at_any_step_of_a_direct_commit_leaves_no_partial_message(tmp_path):
    """One recipient linked at commit, no state file: a kill leaves no 250,
    no truncated Maildir file and, after recovery, nothing in the queue."""
    full = maildir_bytes("alice@example.org", MESSAGE)
    outcomes = set()
    for step in range(100):
        queue, mail, fs, spool, router = killed_linking_run(tmp_path, step)
        route = completing(router)
        answered = []
        try:
            spool.accept(envelope(recipients=("bob@example.test",)),
                         MESSAGE, router=route).addBoth(answered.append)
        except Crash:
            pass
        box = mail / "example.test" / "bob" / "new"
        files = [box / name for name in os.listdir(box)] if box.exists() else []
        assert all(path.read_bytes() == full for path in files)
        if fs.crashed:
            assert answered in ([], ) or not isinstance(answered[0], str)
            outcomes.add("killed")
        else:
            assert answered == [QID] and len(files) == 1
            outcomes.add("delivered")
        assert result_of(make_spool(queue).recover()) == []
        assert not queue.exists() or os.listdir(queue) == []
        if not fs.crashed:
            break                       # every step before this one was a kill
    assert outcomes == {"killed", "delivered"}


def test_several_recipients_keep_the_state_file_so_a_crash_cannot_half_deliver(tmp_path):
    written = []

    class Recording(FileSystem):
        def open_existing(self, path):
            written.append(path)
            return super().open_existing(path)

        def open_new(self, path):
            written.append(path)
            return super().open_new(path)

    queue, mail = tmp_path / "queue", tmp_path / "mail"
    spool = make_spool(queue, fs=Recording())
    router = linking_router(mail)
    route = completing(router)
    result_of(spool.accept(envelope(recipients=("bob@example.test", "carol@example.test")),
                           MESSAGE, router=route))
    assert any(QID + ".json" in os.path.basename(path) for path in written)
    assert len(new_files(mail, "bob")) == 1 and len(new_files(mail, "carol")) == 1
    assert spool.get(QID).retired


def test_a_router_that_fails_or_waits_still_commits(tmp_path):
    queue, mail = tmp_path / "queue", tmp_path / "mail"
    spool = make_spool(queue)

    def broken(entry):
        raise RuntimeError("routing bug")
    assert result_of(spool.accept(envelope(), MESSAGE, router=broken)) == QID
    assert spool.get(QID).linked is None and new_files(mail, "bob") == []
    later = defer.Deferred()
    route = waiting(later)
    other = "0005f1e2d3c4b5a6cafef00d"
    d = spool.accept(envelope(qid=other), MESSAGE, router=route)
    assert not d.called
    later.errback(RuntimeError("lookup failed"))
    assert result_of(d) == other and spool.get(other).linked is None


def test_a_kill_at_any_step_of_a_linking_commit_links_only_committed_messages(tmp_path):
    """Links come after the commit rename: no Maildir ever holds an uncommitted message."""
    outcomes = set()
    for step in range(50):
        queue, mail, fs, spool, route = killed_linking_run(tmp_path, step)
        result_of(spool.accept(envelope(recipients=("bob@example.test", "carol@example.test")),
                               MESSAGE, router=route))
        committed = (queue / (QID + ".json")).exists()
        linked = new_files(mail, "bob") + new_files(mail, "carol")
        if not committed:
            assert linked == []
            outcomes.add("none")
        else:
            outcomes.add("linked" if len(linked) == 2 else "committed")
        if not fs.crashed:
            assert len(linked) == 2
            break
    else:
        pytest.fail("accept never completed")
    assert outcomes == {"none", "committed", "linked"}


def test_the_free_space_answer_is_reused_briefly(tmp_path):
    calls = []

    def statvfs(path):
        calls.append(path)
        return SimpleNamespace(f_bavail=10**6, f_frsize=4096, f_files=1000, f_favail=1000)

    clock = task.Clock()
    spool = make_spool(tmp_path / "queue", clock=clock, statvfs=statvfs)
    assert spool.space_available(100) and spool.space_available(100)
    assert len(calls) == 1
    clock.advance(0.5)
    assert spool.space_available(100) and len(calls) == 2
