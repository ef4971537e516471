"""DATA streams to the spool (issue 17): a big body is in a file as it
arrives, memory per transaction stays bounded, and no refusal or dropped
connection leaves a file behind."""

import hashlib
import os

from twisted.internet import defer

from appliance import replies
from appliance.maildir import maildir_bytes, wire_bytes
from appliance.policy.checks import Verdict
from appliance.policy.dkim_body import BodyHashes
from appliance.queue.incoming import BACKLOG, CHUNK, SPILL_AT, SpooledMessage
from appliance.testing import (
    FakeDirectory, FakeSpool, HandRunner, SMTPHarness, make_config)

USERS = {"alice@example.test": ["alice@example.test"]}
HEAD = b"From: a@remote.test\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n"
LINE = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?\r\n"


def body_of(size):
    """A body as sent: some lines start with a dot, doubled on the wire."""
    lines = [LINE] * (size // len(LINE))
    lines[1::97] = [b".." + LINE] * len(lines[1::97])
    return b"".join(lines)


def harness(tmp_path, runner=None, **server):
    spool = FakeSpool(body_dir=str(tmp_path), body_runner=runner)
    config = make_config(server={"max_message_size": "50M", **server})
    h = SMTPHarness(config=config, directory=FakeDirectory(USERS, ("example.test",)),
                    spool=spool)
    h.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n"
           b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert h.codes() == [220, 250, 250, 250, 354]
    return h, spool


def files(tmp_path):
    return sorted(os.listdir(tmp_path))


def unstuffed(data):
    return data.replace(b"\r\n..", b"\r\n.")


def incoming(h):
    return h.protocol._txn.incoming


def test_the_body_is_in_the_file_before_the_end_of_data_and_memory_stays_bounded(tmp_path):
    h, spool = harness(tmp_path)
    body = body_of(4 * 1024 * 1024)
    piece = 64 * 1024
    for start in range(0, len(body), piece):
        h.send(body[start:start + piece] if start else HEAD + body[:piece])
        message = incoming(h)
        if message.file is not None:
            # The structural bound: in memory, the header section and at most
            # a chunk still on its way to the file (the framer: one read).
            assert message._rest_size == 0
            assert message.file._pending_size < CHUNK
            assert h.protocol._framer.buffered <= piece
    [name] = files(tmp_path)
    on_disk = os.path.getsize(tmp_path / name)
    assert on_disk > len(body) - CHUNK - piece       # already there, as it came
    h.send(b".\r\n")
    assert h.codes() == [250]
    [(envelope, message)] = spool.accepted
    assert isinstance(message, SpooledMessage)
    assert envelope.size == message.size == len(message.front) + len(unstuffed(body))
    assert message.front.endswith(HEAD) and message.front.startswith(b"Received: ")
    with open(message.body.path, "rb") as f:
        stored = maildir_bytes(envelope.sender, message.front) + f.read()
    assert wire_bytes(stored) == message.front + unstuffed(body)


def test_a_small_message_stays_in_memory_as_before(tmp_path):
    h, spool = harness(tmp_path)
    h.send(HEAD + body_of(SPILL_AT // 2) + b".\r\n")
    assert h.codes() == [250]
    [(_, message)] = spool.accepted
    assert isinstance(message, bytes) and files(tmp_path) == []


def test_the_client_is_not_read_while_the_file_is_behind(tmp_path):
    threads = HandRunner()
    threads.hold = True
    h, spool = harness(tmp_path, runner=threads)
    h.send(HEAD)
    body = body_of(3 * 1024 * 1024)
    sent = 0
    while h.transport.producerState != "paused":
        h.send(body[sent:sent + 64 * 1024])
        sent += 64 * 1024
        assert sent < len(body)
    held = incoming(h).file._pending_size
    assert BACKLOG <= held < BACKLOG + CHUNK + 64 * 1024
    threads.run_all()               # the file catches up: reading goes on
    assert h.transport.producerState == "producing"
    h.send(body[sent:] + b".\r\n")
    threads.release()
    assert h.codes() == [250]
    [(_, message)] = spool.accepted
    assert message.size == len(message.front) + len(unstuffed(body))


def test_too_big_leaves_no_file(tmp_path):
    h, spool = harness(tmp_path, max_message_size="1M")
    h.send(HEAD + body_of(SPILL_AT * 2))
    assert len(files(tmp_path)) == 1
    h.send(body_of(1024 * 1024) + b".\r\n")
    assert h.replies()[-1].startswith("552 5.3.4")
    assert files(tmp_path) == [] and spool.accepted == []


def test_a_dropped_connection_leaves_no_file(tmp_path):
    threads = HandRunner()
    threads.hold = True
    h, spool = harness(tmp_path, runner=threads)
    h.send(HEAD + body_of(SPILL_AT * 3))
    threads.run_all()
    assert len(files(tmp_path)) == 1
    h.lose()
    threads.release()
    assert files(tmp_path) == [] and spool.accepted == []


def test_a_storage_failure_after_data_leaves_no_file(tmp_path):
    h, spool = harness(tmp_path)
    spool.error = OSError(28, "No space left on device")
    h.send(HEAD + body_of(SPILL_AT * 2) + b".\r\n")
    assert h.replies()[-1].startswith("451 4.3.0")
    assert files(tmp_path) == []


class RefusingChecks:
    """Inbound checks that read the body's DKIM hash from what they are given, then refuse."""

    def __init__(self):
        self.seen = []

    def check(self, facts, message, context, body=None):
        self.seen.append((message, body.digest(b"relaxed", "sha256")))
        return defer.succeed(Verdict(message, refusal=replies.DMARC_REJECTED))


def test_a_refusal_by_the_checks_leaves_no_file_and_they_hash_the_file(tmp_path):
    h, spool = harness(tmp_path)
    h.factory.checks = checks = RefusingChecks()
    body = body_of(SPILL_AT * 3)
    h.send(HEAD + body + b".\r\n")
    assert h.replies()[-1].startswith("550 5.7.1")
    [(front, digest)] = checks.seen
    assert front == HEAD            # the header section and its blank line only
    expected = BodyHashes({(b"relaxed", "sha256")})
    expected.update(unstuffed(body))
    assert digest == expected.digests()[(b"relaxed", "sha256")]
    assert files(tmp_path) == [] and spool.accepted == []


def test_an_oversized_header_section_is_refused_and_never_spills(tmp_path):
    h, spool = harness(tmp_path)
    h.send(b"".join(b"X-Filler-%07d: %s" % (n, LINE) for n in range(20000)))
    assert incoming(h).overflow and incoming(h).file is None
    h.send(b"\r\n" + body_of(SPILL_AT * 2) + b".\r\n")
    assert h.replies()[-1].startswith("552 5.3.4")
    assert files(tmp_path) == [] and spool.accepted == []
