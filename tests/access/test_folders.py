"""The Maildir access layer shared by IMAP and POP3 (appliance.access.folders)."""

import os

import pytest

from appliance.access import folders as md
from appliance.deliver.maildir import MaildirDeliverer
from appliance.maildir import already_in_cur, message_name
from appliance.envelope import Envelope
from appliance.durable.commit import FileSystem, GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.testing import value_of as result_of

ADDRESS = "alice@example.test"


@pytest.fixture
def store(tmp_path):
    return md.MaildirStore(str(tmp_path / "mail"), synchronous_runner, hostname="mx.test")


@pytest.fixture
def user(store):
    user = store.user(ADDRESS)
    result_of(user.ensure())
    return user


def drop(user, name, data=b"Subject: hi\n\nbody\n", where="new", mtime=None):
    path = os.path.join(user.path, where, name)
    with open(path, "wb") as f:
        f.write(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def fresh(tmp_path, address=ADDRESS):
    """A second store on the same disk: what the server sees after a restart."""
    return md.MaildirStore(str(tmp_path / "mail"), synchronous_runner).user(address)


def test_user_maildir_is_where_delivery_writes(store, tmp_path):
    assert store.user(ADDRESS).path == str(tmp_path / "mail" / "example.test" / "alice")


def test_scan_moves_new_to_cur_keeping_the_base_name(user):
    drop(user, "100.Qa.host")
    result = result_of(user.folder("INBOX").scan())
    assert os.listdir(os.path.join(user.path, "new")) == []
    assert os.listdir(os.path.join(user.path, "cur")) == ["100.Qa.host:2,"]
    assert [m.base for m in result.messages] == ["100.Qa.host"]
    assert result.recent == {1}
    assert already_in_cur(FileSystem(), user.path, "100.Qa.host")


def test_uids_follow_delivery_order_and_survive_a_restart(user, tmp_path):
    for i, name in enumerate(["300.Qc.h", "100.Qa.h", "200.Qb.h"]):
        drop(user, name, mtime=1000 + [3, 1, 2][i])
    first = result_of(user.folder("INBOX").scan())
    assert [(m.uid, m.base) for m in first.messages] == [
        (1, "100.Qa.h"), (2, "200.Qb.h"), (3, "300.Qc.h")]
    again = result_of(fresh(tmp_path).folder("INBOX").scan())
    assert [(m.uid, m.base) for m in again.messages] == [(m.uid, m.base) for m in first.messages]
    assert again.uidvalidity == first.uidvalidity
    assert again.recent == frozenset()


def test_mail_delivered_while_down_gets_the_next_uids(user, tmp_path):
    drop(user, "100.Qa.h")
    first = result_of(user.folder("INBOX").scan())
    result_of(first_folder_expunge(user, [1]))
    drop(user, "200.Qb.h")
    drop(user, "300.Qc.h", mtime=2_000_000_000)
    later = result_of(fresh(tmp_path).folder("INBOX").scan())
    assert [m.uid for m in later.messages] == [2, 3]
    assert later.uidnext == 4
    assert later.uidvalidity == first.uidvalidity


def first_folder_expunge(user, uids):
    return user.folder("INBOX").expunge(uids)


def test_a_redone_delivery_is_not_shown_twice(user):
    drop(user, "100.Qa.h")
    result_of(user.folder("INBOX").scan())
    drop(user, "100.Qa.h")          # a crash redo wrote the same name again
    result = result_of(user.folder("INBOX").scan())
    assert [m.uid for m in result.messages] == [1]
    assert os.listdir(os.path.join(user.path, "new")) == []


def test_messages_removed_by_a_tool_disappear(user):
    drop(user, "100.Qa.h")
    drop(user, "200.Qb.h")
    folder = user.folder("INBOX")
    result_of(folder.scan())
    os.unlink(os.path.join(user.path, "cur", "100.Qa.h:2,"))
    result = result_of(folder.scan())
    assert [m.uid for m in result.messages] == [2]


def test_read_gives_crlf_and_sizes_count_crlf_octets(user):
    data = b"Subject: hi\n\nline one\nline two\r\nend"
    drop(user, "100.Qa.h", data)
    folder = user.folder("INBOX")
    message = result_of(folder.scan()).messages[0]
    body = result_of(folder.read(message))
    assert body == b"Subject: hi\r\n\r\nline one\r\nline two\r\nend"
    assert message.size == len(body)
    assert result_of(folder.read_headers([message])) == [b"Subject: hi\r\n\r\n"]


def test_flags_map_to_maildir_info_letters(user, tmp_path):
    drop(user, "100.Qa.h")
    folder = user.folder("INBOX")
    result_of(folder.scan())
    changed = result_of(folder.store([1], ["\\Seen", "\\Answered", "\\Flagged", "\\Deleted",
                                           "\\Draft", "$Forwarded"], "set"))
    assert changed[0].info == "DFRSTa"
    assert os.listdir(os.path.join(user.path, "cur")) == ["100.Qa.h:2,DFRSTa"]
    result_of(folder.store([1], ["\\Deleted", "$forwarded"], "remove"))
    assert os.listdir(os.path.join(user.path, "cur")) == ["100.Qa.h:2,DFRS"]
    reopened = fresh(tmp_path).folder("INBOX")
    message = result_of(reopened.scan()).messages[0]
    assert sorted(reopened.flags_of(message)) == ["\\Answered", "\\Draft", "\\Flagged",
                                                  "\\Seen"]


def test_keywords_are_kept_per_folder_and_survive_a_restart(user, tmp_path):
    drop(user, "100.Qa.h")
    folder = user.folder("INBOX")
    result_of(folder.scan())
    result_of(folder.store([1], ["$Junk", "work"], "add"))
    reopened = fresh(tmp_path).folder("INBOX")
    message = result_of(reopened.scan()).messages[0]
    assert reopened.flags_of(message) == ["$Junk", "work"]


def test_letters_we_do_not_map_survive_a_flags_replace(user):
    drop(user, "100.Qa.h:2,PS", where="cur")
    folder = user.folder("INBOX")
    result_of(folder.scan())
    result_of(folder.store([1], ["\\Flagged"], "set"))
    assert os.listdir(os.path.join(user.path, "cur")) == ["100.Qa.h:2,FP"]


def test_a_27th_keyword_is_dropped(user):
    drop(user, "100.Qa.h")
    folder = user.folder("INBOX")
    result_of(folder.scan())
    result_of(folder.store([1], [f"k{i}" for i in range(27)], "add"))
    assert len(folder.keywords) == 26
    assert not folder.can_add_keywords
    assert "k26" not in folder.flags_of(folder.get(1))


def test_append_assigns_the_next_uid_and_stores_lf(user):
    folder = user.folder("INBOX")
    drop(user, "100.Qa.h")
    result_of(folder.scan())
    message = result_of(folder.append(b"Subject: x\r\n\r\nhi\r\n", ["\\Seen"], date=1e9))
    assert message.uid == 2 and message.info == "S"
    assert message.size == len(b"Subject: x\r\n\r\nhi\r\n")
    path = os.path.join(user.path, "cur", message.filename)
    with open(path, "rb") as f:
        assert f.read() == b"Subject: x\n\nhi\n"
    assert os.stat(path).st_mtime == 1e9
    assert os.listdir(os.path.join(user.path, "tmp")) == []


def test_append_to_a_folder_never_scanned_counts_existing_files(user):
    drop(user, "100.Qa.h")
    message = result_of(user.folder("INBOX").append(b"x\r\n"))
    assert message.uid == 2


def test_copy_and_move_between_folders(user):
    drop(user, "100.Qa.h")
    drop(user, "200.Qb.h")
    inbox, trash = user.folder("INBOX"), user.folder("Trash")
    result_of(inbox.scan())
    result_of(inbox.store([1], ["\\Seen", "$Junk"], "add"))
    assert result_of(inbox.copy_to([1, 99], trash)) == [(1, 1)]
    assert [m.uid for m in inbox.messages] == [1, 2]
    assert trash.flags_of(trash.get(1)) == ["\\Seen", "$Junk"]
    assert result_of(inbox.copy_to([2], trash, move=True)) == [(2, 2)]
    assert [m.uid for m in inbox.messages] == [1]
    assert [m.uid for m in result_of(trash.scan()).messages] == [1, 2]
    assert [m.uid for m in result_of(inbox.scan()).messages] == [1]
    assert result_of(trash.read(trash.get(2))) == b"Subject: hi\r\n\r\nbody\r\n"


def test_copy_into_the_same_folder_makes_a_new_message(user):
    drop(user, "100.Qa.h")
    inbox = user.folder("INBOX")
    result_of(inbox.scan())
    assert result_of(inbox.copy_to([1], inbox)) == [(1, 2)]
    assert len(result_of(inbox.scan()).messages) == 2


def test_expunge_removes_files_and_uid_list_entries(user, tmp_path):
    drop(user, "100.Qa.h")
    drop(user, "200.Qb.h")
    inbox = user.folder("INBOX")
    result_of(inbox.scan())
    assert result_of(inbox.expunge([1, 7])) == [1]
    assert os.listdir(os.path.join(user.path, "cur")) == ["200.Qb.h:2,"]
    with open(os.path.join(user.path, md.UIDLIST)) as f:
        assert ":100.Qa.h" not in f.read()


def test_a_damaged_uid_list_means_a_new_uidvalidity(user, tmp_path):
    drop(user, "100.Qa.h")
    first = result_of(user.folder("INBOX").scan())
    with open(os.path.join(user.path, md.UIDLIST), "w") as f:
        f.write("garbage\n")
    later = result_of(fresh(tmp_path).folder("INBOX").scan())
    assert later.uidvalidity != first.uidvalidity


def test_listeners_hear_about_changes(user):
    drop(user, "100.Qa.h")
    inbox = user.folder("INBOX")
    heard = []
    inbox.add_listener(heard.append)
    result_of(inbox.scan())
    result_of(inbox.store([1], ["\\Seen"], "add"))
    result_of(inbox.expunge([1]))
    inbox.remove_listener(heard.append)
    assert heard == [inbox, inbox]


def test_take_recent_goes_to_one_session(user):
    drop(user, "100.Qa.h")
    inbox = user.folder("INBOX")
    result_of(inbox.scan())
    assert inbox.take_recent() == {1}
    assert inbox.take_recent() == set()


def test_changed_on_disk_stats_only_the_directories(user):
    inbox = user.folder("INBOX")
    result_of(inbox.scan())
    assert result_of(inbox.changed_on_disk()) is False
    drop(user, "100.Qa.h")
    assert result_of(inbox.changed_on_disk()) is True


def test_folders_are_shared_while_open(store, user):
    assert user.folder("INBOX") is store.user(ADDRESS).folder("inbox")


def test_exclusive_lock_for_pop3(user):
    inbox = user.folder("INBOX")
    one, two = object(), object()
    assert inbox.try_lock(one) and inbox.try_lock(one)
    assert not inbox.try_lock(two)
    inbox.unlock(two)
    assert inbox.locked_by is one
    inbox.unlock(one)
    assert inbox.try_lock(two)


def test_delivery_and_scan_agree_on_names(tmp_path, store):
    """A message delivered, seen by IMAP (moved to cur/), then delivered again
    after a crash: the redo is recognised, one copy stays."""
    root = str(tmp_path / "mail")
    writer = GroupCommitWriter(synchronous_runner)
    deliverer = MaildirDeliverer(root, writer, "mx.test")
    envelope = Envelope("0123456789abcdef", "bob@example.org", [ADDRESS], 1700000000.0)
    result_of(deliverer.deliver(envelope, b"Subject: x\r\n\r\nhello\r\n", [ADDRESS]))
    inbox = store.user(ADDRESS).folder("INBOX")
    (message,) = result_of(inbox.scan()).messages
    assert message.base == message_name(envelope.queue_id, envelope.received_at, "mx.test")
    redo = result_of(deliverer.deliver(envelope, b"Subject: x\r\n\r\nhello\r\n", [ADDRESS]))
    assert redo[ADDRESS].existed
    assert [m.uid for m in result_of(inbox.scan()).messages] == [1]


# -- names ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "", "../x", "..", ".", "a/b", "/etc", "a\\b", "a\x00b", "a\nb", "a..b", ".hidden",
    "trailing.", "INBOX.sub", "x" * 201,
])
def test_names_that_could_escape_or_are_not_storable_are_refused(user, name):
    with pytest.raises(md.FolderNameError):
        user.folder(name)


def test_inbox_is_case_insensitive_and_is_the_root(user):
    assert user.folder_path("inbox") == user.path
    assert user.folder("InBoX").name == "INBOX"


def test_non_ascii_names_are_stored_in_modified_utf7(user):
    result_of(user.create("Entwürfe.2024"))
    assert ".Entw&APw-rfe.2024" in os.listdir(user.path)
    assert "Entwürfe.2024" in result_of(user.list_folders())
    assert md.decode_name(".&Jjo-") == "\u263a"
    assert md.decode_name(".a&-b") == "a&b"
    assert md.decode_name("..") is None and md.decode_name("cur") is None


def test_ensure_makes_special_folders_once_and_subscribes_them(store):
    user = store.user(ADDRESS)
    assert sorted(result_of(user.ensure())) == ["Drafts", "Junk", "Sent", "Trash"]
    assert result_of(user.ensure()) == []
    assert result_of(user.list_folders()) == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    assert result_of(user.subscriptions()) == {"Drafts", "Junk", "Sent", "Trash"}
    assert os.path.exists(os.path.join(user.path, ".Sent", "maildirfolder"))


def test_create_delete_rename(user):
    result_of(user.create("Work"))
    result_of(user.create("Work.Old"))
    with pytest.raises(md.FolderExists):
        result_of(user.create("Work"))
    result_of(user.subscribe("Work.Old"))
    result_of(user.rename("Work", "Jobs"))
    folders = result_of(user.list_folders())
    assert "Jobs" in folders and "Jobs.Old" in folders and "Work" not in folders
    assert "Jobs.Old" in result_of(user.subscriptions())
    result_of(user.delete("Jobs"))
    assert "Jobs" not in result_of(user.list_folders())
    assert "Jobs.Old" in result_of(user.list_folders())
    with pytest.raises(md.FolderMissing):
        result_of(user.delete("Jobs"))
    with pytest.raises(md.FolderError):
        result_of(user.delete("INBOX"))
    assert os.listdir(os.path.join(user.path, "tmp")) == []


def test_rename_inbox_moves_its_messages(user):
    drop(user, "100.Qa.h")
    result_of(user.rename("INBOX", "Old"))
    assert result_of(user.folder("INBOX").scan()).messages == ()
    assert [m.base for m in result_of(user.folder("Old").scan()).messages] == ["100.Qa.h"]


def test_scan_of_a_missing_folder_fails(user):
    with pytest.raises(md.FolderMissing):
        result_of(user.folder("Nope").scan())


def test_uidlist_format_round_trips():
    messages = [md.Message(1, "a.b", "", 10, 5.0), md.Message(7, "c :d", "S", 3, 6.5)]
    text = md.format_uidlist(42, 8, ("$Junk",), messages).decode()
    assert md.parse_uidlist(text) == (42, 8, ["$Junk"], [(1, 10, 5.0, "a.b"),
                                                          (7, 3, 6.5, "c :d")])
    with pytest.raises(ValueError):
        md.parse_uidlist("1 V0 N1\n")
