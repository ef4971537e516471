"""Maildir delivery: layout, names, conversion, idempotent redo, shared fsyncs."""

import errno
import os
import stat

import pytest
from twisted.python.failure import Failure

from appliance.testing import HandRunner as ManualRunner
from appliance.deliver.maildir import Delivered, MaildirDeliverer
from appliance.maildir import (SpoolFile, maildir_bytes, maildir_path, message_name,
                               path_component, round_trips, wire_bytes)
from appliance.envelope import Envelope
from appliance.durable.commit import FileSystem, GroupCommitWriter, StorageError
from appliance.threads import synchronous_runner
from appliance.testing import outcome as result_of

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


def envelope(qid="0005f1e2d3c4b5a6deadbeef", sender="alice@example.org"):
    return Envelope(queue_id=qid, sender=sender, recipients=["bob@example.test"],
                    received_at=1700000000.5)


def deliverer(root, fs=None, runner=synchronous_runner):
    return MaildirDeliverer(str(root), GroupCommitWriter(runner, fs), "mail.example.test")


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


def spool_file(tmp_path, message=MESSAGE, maildir_form=True):
    """A committed spool message file, as appliance.queue.store writes it."""
    data = maildir_bytes("alice@example.org", message) if maildir_form else message
    path = tmp_path / "spooled.msg"
    path.write_bytes(data)
    return SpoolFile(str(path), maildir_form, len(data))


def test_the_stored_form_gives_back_the_message_as_received():
    stored = maildir_bytes("alice@example.org", MESSAGE)
    assert round_trips(MESSAGE) and wire_bytes(stored) == MESSAGE
    odd = b"Subject: x\r\n\r\nbare\rcr and \r\r\n and no end"
    assert round_trips(odd) and wire_bytes(maildir_bytes("a@b.example", odd)) == odd
    assert not round_trips(b"Subject: x\n\nbare lf\r\n")


def test_delivery_from_the_spool_file_is_a_hard_link(tmp_path):
    root = tmp_path / "mail"
    source = spool_file(tmp_path)
    fs = CountingFS()
    result = result_of(deliverer(root, fs).deliver(
        envelope(), source, ["bob@example.test", "carol@example.test"]))
    for user in ("bob", "carol"):
        delivered = result[f"{user}@example.test"]
        assert delivered.size == source.size and not delivered.existed
        assert os.stat(delivered.path).st_ino == os.stat(source.path).st_ino
        assert os.listdir(root / "example.test" / user / "tmp") == []
        assert str(root / "example.test" / user / "new") in fs.dir_syncs
    assert fs.file_syncs == 0       # the spool fsynced the data once, at commit


def test_a_link_redone_after_a_crash_finds_its_file(tmp_path):
    root = tmp_path / "mail"
    source = spool_file(tmp_path)
    d = deliverer(root)
    result_of(d.deliver(envelope(), source, ["bob@example.test"]))
    again = result_of(d.deliver(envelope(), source, ["bob@example.test"]))
    assert isinstance(again["bob@example.test"], Delivered)
    assert len(os.listdir(root / "example.test" / "bob" / "new")) == 1


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EMLINK, errno.EPERM])
def test_where_no_link_can_be_made_the_message_is_copied(tmp_path, code):
    class NoLinks(CountingFS):
        def link(self, src, dst):
            raise OSError(code, os.strerror(code))

    root = tmp_path / "mail"
    source = spool_file(tmp_path)
    fs = NoLinks()
    result = result_of(deliverer(root, fs).deliver(envelope(), source, ["bob@example.test"]))
    path = result["bob@example.test"].path
    assert open(path, "rb").read() == maildir_bytes("alice@example.org", MESSAGE)
    assert os.stat(path).st_ino != os.stat(source.path).st_ino and fs.file_syncs == 1


def test_a_spool_file_in_the_wire_form_is_converted_as_it_is_copied(tmp_path):
    root = tmp_path / "mail"
    source = spool_file(tmp_path, maildir_form=False)
    result = result_of(deliverer(root).deliver(envelope(), source, ["bob@example.test"]))
    path = result["bob@example.test"].path
    assert open(path, "rb").read() == maildir_bytes("alice@example.org", MESSAGE)
    assert os.stat(path).st_ino != os.stat(source.path).st_ino


def test_other_link_errors_fail_that_mailbox(tmp_path):
    class Broken(FileSystem):
        def link(self, src, dst):
            raise OSError(errno.EIO, "Input/output error")

    result = result_of(deliverer(tmp_path / "mail", Broken()).deliver(
        envelope(), spool_file(tmp_path), ["bob@example.test"]))
    assert result["bob@example.test"].check(StorageError)


def test_commit_links_make_missing_maildirs_once_and_name_the_links(tmp_path):
    root = tmp_path / "mail"
    d = deliverer(root)
    fs = CountingFS()
    links = d.commit_links(envelope(), ["bob@example.test", "bob@example.test",
                                        "carol@example.test"])
    pairs, created = links.prepare(fs, "/spool/x.msg")
    name = message_name("0005f1e2d3c4b5a6deadbeef", 1700000000.5, "mail.example.test")
    assert pairs == [("/spool/x.msg", str(root / "example.test" / u / "new" / name))
                     for u in ("bob", "carol")]
    assert str(root / "example.test") in created      # parents to fsync with the commit
    again = d.commit_links(envelope(qid="00000000ab"), ["bob@example.test"])
    calls = []
    fs.mkdir = lambda path, mode=0o700: calls.append(path)
    again.prepare(fs, "/spool/y.msg")
    assert calls == []                                  # known complete: no mkdir at all
    failed = {pairs[1][1]: OSError(errno.ENOENT, "gone")}
    results = links.results(failed, 99)
    assert results["bob@example.test"] == Delivered("bob@example.test", pairs[0][1], name,
                                                    99, False)
    assert results["carol@example.test"].check(OSError)


def test_commit_links_leave_a_maildir_folder_to_the_full_delivery(tmp_path):
    quarantined = Envelope(queue_id="0005f1e2d3c4b5a6deadbeef", sender="a@b.example",
                           recipients=["bob@example.test"], received_at=1.0,
                           params={"folder": "Junk"})
    assert deliverer(tmp_path).commit_links(quarantined, ["bob@example.test"]) is None
