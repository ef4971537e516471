"""A message whose body is in a spool file (issue 17): the commit writes
<id>.msg as its front plus a kernel copy of the body file, fsyncs and links
it in one batch, and removes the body file; a failed commit leaves the body
file to its owner, who discards it."""

import os

import pytest
from twisted.internet import task

from appliance.durable.commit import FileSystem, GroupCommitWriter, Spliced, run_batch, Durable
from appliance.durable.writer_process import ChildProcessFileSystem
from appliance.envelope import Envelope
from appliance.maildir import maildir_bytes, wire_bytes
from appliance.queue.incoming import IncomingMessage
from appliance.queue.store import Spool
from appliance.testing import outcome as result_of
from appliance.threads import synchronous_runner

QID = "0005f1e2d3c4b5a6deadbeef"
FRONT = b"Received: from a\r\nSubject: big\r\n\r\n"
BODY = b"".join(b"line %d\r\n" % n for n in range(200_000))


def envelope(recipients=("bob@example.test",)):
    return Envelope(queue_id=QID, sender="alice@example.org", recipients=list(recipients),
                    received_at=1000.0, helo="client.example.org", peer_ip="192.0.2.1")


def spool_in(directory, fs=None):
    spool = Spool(str(directory), GroupCommitWriter(synchronous_runner, fs),
                  synchronous_runner, task.Clock(), incoming=synchronous_runner)
    result_of(spool.recover())
    return spool


def received(spool):
    """The body as DATA hands it over: into a body file of ``spool``."""
    incoming = IncomingMessage(spool.body_file)
    incoming.write(FRONT)
    lines = BODY.splitlines(keepends=True)
    for start in range(0, len(lines), 5000):        # whole lines, as DataBody writes
        incoming.write(b"".join(lines[start:start + 5000]))
    assert incoming.file is not None
    result_of(incoming.finish())
    return incoming


@pytest.mark.parametrize("child", [False, True])
def test_the_message_file_is_the_front_and_the_body_and_the_body_file_is_gone(tmp_path, child):
    fs = ChildProcessFileSystem(str(tmp_path / "queue.lock"), threads=2) if child else None
    try:
        queue = tmp_path / "queue"
        spool = spool_in(queue, fs)
        incoming = received(spool)
        message, size = incoming.to_spool(b"X-Ours: 1\r\n" + incoming.front())
        assert result_of(spool.accept(envelope(), message)) == QID
    finally:
        if fs is not None:
            fs.shutdown()
    assert sorted(os.listdir(queue)) == [QID + ".json", QID + ".msg"]
    whole = b"X-Ours: 1\r\n" + FRONT + BODY
    stored = (queue / (QID + ".msg")).read_bytes()
    assert stored == maildir_bytes("alice@example.org", whole)
    entry = spool.get(QID)
    assert (entry.message_size, entry.stored_size) == (size, len(stored)) == (
        len(whole), len(stored))
    assert result_of(spool.read(QID)) == whole
    assert wire_bytes(stored) == whole


def test_a_failed_commit_leaves_the_body_file_for_its_owner_to_discard(tmp_path):
    class Full(FileSystem):
        def fsync(self, fd):
            raise OSError(28, "No space left on device")

    queue = tmp_path / "queue"
    spool = spool_in(queue, Full())
    incoming = received(spool)
    message, _ = incoming.to_spool(incoming.front())
    failure = result_of(spool.accept(envelope(), message))
    assert "No space left" in str(failure.value)
    assert [name for name in os.listdir(queue) if name.startswith("incoming.")] != []
    result_of(incoming.discard())
    assert os.listdir(queue) == []


def test_a_spliced_write_fails_when_the_source_changed_size(tmp_path):
    source = tmp_path / "body"
    source.write_bytes(b"abc\n")
    target = str(tmp_path / "msg")
    plan = lambda fs: Durable(writes=[(target, Spliced(b"head\n", str(source), 5 + 10))],
                              rollback=[target])
    [(ok, error)] = run_batch(FileSystem(), [plan])
    assert not ok and isinstance(error, OSError) and not os.path.exists(target)


def test_recovery_removes_a_body_file_a_crash_left(tmp_path):
    queue = tmp_path / "queue"
    spool = spool_in(queue)
    incoming = received(spool)
    assert len(os.listdir(queue)) == 1
    assert incoming.file.path.endswith(".tmp")
    result_of(spool_in(queue).recover())
    assert os.listdir(queue) == []
