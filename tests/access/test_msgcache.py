"""The per-folder message cache (appliance.access.msgcache): ENVELOPE and
SEARCH texts kept in ``mailappliance-cache``, correct after deliveries, flag
changes, expunges and crashes."""

import os

import pytest

from appliance.access import msgcache
from appliance.access.imap.server import CACHE_SAVE_DELAY
from appliance.access.msgcache import CACHE_FILE, MessageCache, decode, encode

from test_imap import USER, Env, env, selected, session  # noqa: F401  (fixtures)

FIELDS = (("bob",), (), ("team",), (), ("hello",))


def cache_path(env, folder=""):
    return os.path.join(env.store.user(USER).path, folder, CACHE_FILE)


def on_disk(env):
    with open(cache_path(env), "rb") as f:
        return decode(f.read())


def envelope_lines(session):
    return [line for line in session.ok("UID FETCH 1:* (FLAGS ENVELOPE)") if b"ENVELOPE" in line]


def envelopes_of(lines):
    return [line.partition(b"ENVELOPE")[2] for line in lines]


def envelopes(session):
    return envelopes_of(envelope_lines(session))


def folder_of(env):
    return env.store.user(USER).folder("INBOX")


def save(env):
    env.clock.advance(CACHE_SAVE_DELAY)


# -- the file format ------------------------------------------------------------------------

def test_entries_round_trip():
    entries = [("1.Qa.mx", 120, b'("date" "subject" NIL)', FIELDS),
               ("2.Qb.mx", 99, None, ((), ("",), ("a", "b"), (), ())),
               ("3.Q\udcff.mx", 5, b"{3}\r\n\xe9t\xe9", ((), (), (), (), ("\u00e9t\u00e9",)))]
    found = decode(encode(entries))
    assert found == {base: (size, envelope, fields) for base, size, envelope, fields in entries}


def test_values_holding_a_separator_stay_out_of_the_file():
    found = decode(encode([("1.Qa", 1, b"(e)", (("a\x00b",), (), (), (), ())),
                           ("2.Qb", 1, b"(e)", FIELDS)]))
    assert list(found) == ["2.Qb"]


@pytest.mark.parametrize("damage", [
    lambda data: data[:-1],                                   # a torn write
    lambda data: data[:len(data) // 2],
    lambda data: data[:10] + bytes([data[10] ^ 1]) + data[11:],   # a flipped bit
    lambda data: b"",
    lambda data: b"garbage\n" + data,
])
def test_a_damaged_file_is_refused(damage):
    data = encode([("1.Qa.mx", 10, b"(env)", FIELDS), ("2.Qb.mx", 11, b"(env2)", FIELDS)])
    with pytest.raises(ValueError):
        decode(damage(data))


def test_entries_are_keyed_by_base_and_size(tmp_path):
    cache = MessageCache(str(tmp_path))
    cache.put("1.Qa.mx", 10, b"(env)", FIELDS)
    assert cache.get("1.Qa.mx", 10) == (b"(env)", FIELDS)
    assert cache.get("1.Qa.mx", 11) is None     # not that file: computed again
    assert cache.get("2.Qb.mx", 10) is None


# -- through IMAP -----------------------------------------------------------------------------

def test_envelopes_survive_a_restart_and_are_not_parsed_again(env, selected, tmp_path,
                                                             monkeypatch):
    first = envelope_lines(selected)
    assert len(first) == 2
    save(env)
    cur = os.path.join(env.store.user(USER).path, "cur")
    assert set(on_disk(env)) == {name.partition(":")[0] for name in os.listdir(cur)}
    env.close()

    restarted = Env(tmp_path)
    try:
        parsed = []
        from appliance.access.imap import mime
        real = mime.envelope
        monkeypatch.setattr(mime, "envelope", lambda headers: parsed.append(1) or real(headers))
        again = restarted.session()
        again.login()
        again.ok("SELECT INBOX")
        assert envelopes(again) == envelopes_of(first)
        assert parsed == []                 # every ENVELOPE came from the file
        found = again.ok('UID SEARCH FROM "bob"')
        assert found[0] == b"* SEARCH 1"
    finally:
        restarted.close()


def test_a_delivery_is_added_to_the_cache(env, selected):
    envelope_lines(selected)
    save(env)
    env.deliver(b"From: Carol <carol@example.org>\nSubject: third\n\nbody three\n")
    selected.ok("NOOP")
    lines = envelope_lines(selected)
    assert len(lines) == 3 and b'"carol" "example.org"' in lines[2]
    save(env)
    assert len(on_disk(env)) == 3
    assert selected.ok('SEARCH FROM "carol"')[0] == b"* SEARCH 3"


def test_flag_changes_show_with_cached_envelopes(env, selected):
    before = envelope_lines(selected)
    save(env)
    selected.ok("STORE 1 +FLAGS (\\Flagged $Work)")
    after = envelope_lines(selected)
    assert b"\\Flagged" in after[0] and b"$Work" in after[0]
    assert after[0].partition(b"ENVELOPE")[2] == before[0].partition(b"ENVELOPE")[2]
    assert selected.ok("SEARCH FLAGGED")[0] == b"* SEARCH 1"


def test_an_expunged_message_leaves_the_file(env, selected):
    envelope_lines(selected)
    save(env)
    assert len(on_disk(env)) == 2
    selected.ok("STORE 1 +FLAGS (\\Deleted)")
    selected.ok("EXPUNGE")
    assert len(envelope_lines(selected)) == 1
    assert folder_of(env).cache.dirty         # the expunged entry is owed to the disk
    save(env)
    kept = on_disk(env)
    assert len(kept) == 1
    folder = env.store.user(USER).folder("INBOX")
    assert list(kept) == [m.base for m in folder.messages]


def test_a_damaged_file_is_rebuilt(env, selected, tmp_path):
    first = envelope_lines(selected)
    save(env)
    with open(cache_path(env), "rb") as f:
        data = f.read()
    env.close()
    with open(cache_path(env), "wb") as f:
        f.write(data[:len(data) - 7])           # a crash mid-write without write_atomic
    stray = cache_path(env).replace(CACHE_FILE, f".{CACHE_FILE}.999.tmp")
    with open(stray, "wb") as f:                # and a temp file a crash left behind
        f.write(data[:5])

    restarted = Env(tmp_path)
    try:
        again = restarted.session()
        again.login()
        again.ok("SELECT INBOX")
        assert envelopes(again) == envelopes_of(first)     # computed again, the same
        folder = restarted.store.user(USER).folder("INBOX")
        assert folder.cache.damaged
        restarted.clock.advance(CACHE_SAVE_DELAY)
        assert len(on_disk(restarted)) == 2     # and a good file written
    finally:
        restarted.close()


def test_a_crash_while_saving_keeps_the_old_file(env, selected, monkeypatch):
    envelope_lines(selected)
    save(env)
    old = on_disk(env)
    env.deliver(b"Subject: third\n\nbody three\n")
    selected.ok("NOOP")
    envelope_lines(selected)

    def crash(*args):
        raise OSError("disk pulled")
    monkeypatch.setattr(msgcache, "write_atomic", crash)
    save(env)                                   # logged, not raised to the client
    assert on_disk(env) == old
    monkeypatch.undo()
    selected.ok("SEARCH ALL")
    folder = env.store.user(USER).folder("INBOX")
    assert folder.cache.dirty                   # still owed to the disk
    assert folder.cache.save(folder.messages)
    assert len(on_disk(env)) == 3


def test_a_search_alone_fills_the_search_texts(env, selected):
    assert selected.ok('SEARCH SUBJECT "second"')[0] == b"* SEARCH 2"
    save(env)
    entries = on_disk(env)
    assert len(entries) == 2
    assert all(envelope is None for _, envelope, _ in entries.values())
    lines = envelope_lines(selected)            # computed now, with the texts kept
    assert b'"second"' in lines[1]
