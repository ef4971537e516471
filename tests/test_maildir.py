"""Maildir delivery: layout, names, conversion, idempotent redo, shared fsyncs."""

import os
import stat

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from appliance.deliver.maildir import (Delivered, MaildirDeliverer, maildir_bytes,
                                       maildir_path, message_name, path_component)
from appliance.envelope import Envelope
from appliance.queue.commit import FileSystem, GroupCommitWriter, StorageError, \
    synchronous_runner

MESSAGE = b"Received: from a\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"


class CountingFS(FileSystem):
    def __init__(self):
        self.dir_syncs = []
        self.file_syncs = 0

    def fsync(self, fd):
        self.file_syncs += 1
        super().fsync(fd)

    def fsync_dir(self, path):
        self.dir_syncs.append(path)
        super().fsync_dir(path)


class ManualRunner:
    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        self.calls.append((f, args, defer.Deferred()))
        return self.calls[-1][2]

    def step(self):
        f, args, d = self.calls.pop(0)
        d.callback(f(*args))


def envelope(qid="0005f1e2d3c4b5a6deadbeef", sender="alice@example.org"):
    return Envelope(queue_id=qid, sender=sender, recipients=["bob@example.test"],
                    received_at=1700000000.5)


def deliverer(root, fs=None, runner=synchronous_runner):
    return MaildirDeliverer(str(root), GroupCommitWriter(runner, fs), "mail.example.test")


def result_of(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_path_components_stay_inside_the_root():
    assert path_component("bob") == "bob"
    assert path_component("../../etc") == "%2E.%2F..%2Fetc"   # one component, never ..
    assert path_component(".hidden") == "%2Ehidden"
    assert path_component("a\x00b\nc\\d%e") == "a%00b%0Ac%5Cd%25e"
    assert path_component("jörg") == "jörg"
    with pytest.raises(ValueError):
        path_component("")


def test_maildir_path_is_domain_then_local_part(tmp_path):
    assert maildir_path("/m", "bob@example.test") == "/m/example.test/bob"
    assert maildir_path("/m", "a/b@ex/ample") == "/m/ex%2Fample/a%2Fb"
    assert maildir_path("/m", '"x@y"@example.test') == '/m/example.test/"x@y"'
    with pytest.raises(ValueError):
        maildir_path("/m", "no-at-sign")


def test_message_name_derives_from_the_queue_id_and_escapes_the_host():
    assert message_name("abc123", 1700000000.9, "mail.example.test") == \
        "1700000000.Qabc123.mail.example.test"
    assert message_name("abc123", 1, "a/b:c") == "1.Qabc123.a\\057b\\072c"


def test_stored_form_has_return_path_first_and_lf_endings():
    data = maildir_bytes("alice@example.org", MESSAGE)
    assert data.startswith(b"Return-Path: <alice@example.org>\nReceived: from a\n")
    assert b"\r\n" not in data
    assert maildir_bytes("", b"x\r\n") == b"Return-Path: <>\nx\n"
    assert maildir_bytes("a\r\nX-Injected: 1@x", b"") == b"Return-Path: <aX-Injected: 1@x>\n"


def test_delivery_creates_the_maildir_and_fsyncs_new(tmp_path):
    root = tmp_path / "mail"
    fs = CountingFS()
    results = result_of(deliverer(root, fs).deliver(envelope(), MESSAGE, ["bob@example.test"]))
    box = root / "example.test" / "bob"
    name = "1700000000.Q0005f1e2d3c4b5a6deadbeef.mail.example.test"
    assert results["bob@example.test"] == Delivered(
        "bob@example.test", str(box / "new" / name), name,
        len(maildir_bytes("alice@example.org", MESSAGE)), False)
    assert sorted(os.listdir(box)) == ["cur", "new", "tmp"]
    assert os.listdir(box / "new") == [name] and os.listdir(box / "tmp") == []
    assert (box / "new" / name).read_bytes() == maildir_bytes("alice@example.org", MESSAGE)
    for path in (root, root / "example.test", box, box / "new"):
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
    # The new directories' parents and new/ itself are all made durable.
    assert set(fs.dir_syncs) == {str(tmp_path), str(root), str(root / "example.test"),
                                 str(box), str(box / "new")}


def test_a_redo_replaces_rather_than_duplicates(tmp_path):
    root = tmp_path / "mail"
    d = deliverer(root)
    result_of(d.deliver(envelope(), MESSAGE, ["bob@example.test"]))
    again = result_of(d.deliver(envelope(), MESSAGE, ["bob@example.test"]))
    assert again["bob@example.test"].existed is False
    assert len(os.listdir(root / "example.test" / "bob" / "new")) == 1


@pytest.mark.parametrize("suffix", ["", ":2,S", ":2,RS", ",S=1234:2,"])
def test_a_copy_already_moved_to_cur_counts_as_delivered(tmp_path, suffix):
    root = tmp_path / "mail"
    d = deliverer(root)
    first = result_of(d.deliver(envelope(), MESSAGE, ["bob@example.test"]))["bob@example.test"]
    box = root / "example.test" / "bob"
    os.rename(first.path, box / "cur" / (first.name + suffix))     # what an IMAP client does
    again = result_of(d.deliver(envelope(), MESSAGE, ["bob@example.test"]))
    assert again["bob@example.test"].existed is True
    assert os.listdir(box / "new") == []
    assert len(os.listdir(box / "cur")) == 1


def test_another_message_in_cur_is_not_mistaken_for_this_one(tmp_path):
    root = tmp_path / "mail"
    d = deliverer(root)
    result_of(d.deliver(envelope(qid="aaaaaaaa11"), MESSAGE, ["bob@example.test"]))
    box = root / "example.test" / "bob"
    [name] = os.listdir(box / "new")
    os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
    result = result_of(d.deliver(envelope(qid="aaaaaaaa1"), MESSAGE, ["bob@example.test"]))
    assert result["bob@example.test"].existed is False


def test_one_broken_mailbox_does_not_stop_the_others(tmp_path):
    root = tmp_path / "mail"
    (root / "example.test").mkdir(parents=True)
    (root / "example.test" / "carol").write_bytes(b"a file where a Maildir should be")
    results = result_of(deliverer(root).deliver(
        envelope(), MESSAGE, ["bob@example.test", "carol@example.test"]))
    assert isinstance(results["bob@example.test"], Delivered)
    assert isinstance(results["carol@example.test"], Failure)
    assert results["carol@example.test"].check(StorageError)


def test_the_same_mailbox_twice_gets_one_copy(tmp_path):
    root = tmp_path / "mail"
    results = result_of(deliverer(root).deliver(
        envelope(), MESSAGE, ["bob@example.test", "bob@example.test"]))
    assert list(results) == ["bob@example.test"]
    assert len(os.listdir(root / "example.test" / "bob" / "new")) == 1


def test_many_messages_share_one_fsync_of_new(tmp_path):
    root = tmp_path / "mail"
    (root / "example.test" / "bob").mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (root / "example.test" / "bob" / sub).mkdir()
    fs, runner = CountingFS(), ManualRunner()
    d = deliverer(root, fs, runner)
    first = d.deliver(envelope(qid="00000000ff"), MESSAGE, ["bob@example.test"])
    rest = [d.deliver(envelope(qid=f"0000000{i}aa"), MESSAGE, ["bob@example.test"])
            for i in range(8)]
    runner.step()
    fs.dir_syncs.clear()
    fs.file_syncs = 0
    runner.step()
    assert first.called and all(r.called for r in rest)
    assert fs.file_syncs == 8
    assert fs.dir_syncs == [str(root / "example.test" / "bob" / "new")]
    assert len(os.listdir(root / "example.test" / "bob" / "new")) == 9
