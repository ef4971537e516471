"""appliance.auth.users: hashes, the users file, reload on change, locking."""

import os
import stat
import subprocess
import sys

import argon2
import bcrypt
import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from appliance.auth import users
from appliance.auth.users import (AlreadyExists, NotFound, UsersError, UsersFile,
                                  hash_password, verify_password)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Cheap hashes for the file tests (the format is what matters there).
BCRYPT = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
ARGON2ID = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("s3cret")


def result(d):
    """The result of an already-fired Deferred."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class SyncThreads:
    """A run_in_thread that runs at once and remembers what it ran."""

    def __init__(self):
        self.calls = []

    def __call__(self, function, *args):
        self.calls.append(function.__name__)
        return defer.maybeDeferred(function, *args)


@pytest.fixture
def logged():
    seen = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "users")


# -- hashes -----------------------------------------------------------------

def test_hash_password_is_bcrypt_and_verifies():
    hashed = hash_password("correct horse")
    assert hashed.startswith("$2b$")
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct horsE", hashed)


def test_bcrypt_2a_and_2y_verify():
    assert verify_password("s3cret", "$2a$" + BCRYPT[4:])
    assert verify_password("s3cret", "$2y$" + BCRYPT[4:])


def test_argon2id_verifies():
    assert verify_password("s3cret", ARGON2ID)
    assert not verify_password("wrong", ARGON2ID)


def test_long_passwords_use_argon2id_so_nothing_is_ignored():
    password = "p" * 80
    hashed = hash_password(password)
    assert hashed.startswith("$argon2id$")
    assert verify_password(password, hashed)
    assert not verify_password("p" * 79 + "q", hashed)


def test_bcrypt_hashes_from_elsewhere_compare_the_first_72_bytes():
    hashed = bcrypt.hashpw(b"x" * 72, bcrypt.gensalt(4)).decode()
    assert verify_password("x" * 72, hashed)
    assert verify_password("x" * 72 + "tail", hashed)     # bcrypt's own rule
    assert not verify_password("x" * 71, hashed)


@pytest.mark.parametrize("hashed", [
    "plain", "", "$1$abc$def", "{SSHA}abcdef",
    argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1,
                          type=argon2.Type.I).hash("s3cret"),
    BCRYPT[:-5], "$2b$04$" + "!" * 53, "$argon2id$garbage",
])
def test_unknown_or_damaged_hashes_never_verify(hashed):
    assert verify_password("s3cret", hashed) is False


def test_empty_password_never_verifies_and_cannot_be_hashed():
    assert verify_password("", BCRYPT) is False
    assert verify_password(None, BCRYPT) is False
    with pytest.raises(UsersError, match="empty password"):
        hash_password("")


# -- addresses ----------------------------------------------------------------

def test_addresses_are_canonical():
    assert users.canonical_address("  Alice@Example.TEST ") == "alice@example.test"


@pytest.mark.parametrize("bad", ["alice", "@example.test", "alice@", "a b@x.test",
                                 "a:b@x.test", "a@b@x.test", "a,b@x.test", "a\n@x.test"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(UsersError):
        users.canonical_address(bad)


@pytest.mark.parametrize("bad", ["../x@x.test", "a/b@x.test", ".hidden@x.test"])
def test_account_names_are_safe_as_directory_names(bad, path):
    with pytest.raises(UsersError, match="cannot be an account"):
        UsersFile(path).add(bad, BCRYPT)


def test_base_address_drops_the_tag():
    assert users.base_address("bob+lists@x.test") == "bob@x.test"
    assert users.base_address("bob+a+b@x.test") == "bob@x.test"
    assert users.base_address("+weird@x.test") == "+weird@x.test"
    assert users.base_address("bob@x.test") == "bob@x.test"


# -- the file -----------------------------------------------------------------

def test_missing_file_is_empty(path):
    file = UsersFile(path)
    assert file.list() == [] and file.lookup("a@x.test") is None


def test_add_lookup_list_passwd_delete(path):
    file = UsersFile(path)
    file.add("Bob@X.test", BCRYPT)
    file.add("alice@x.test", ARGON2ID)
    assert file.list() == ["alice@x.test", "bob@x.test"]
    assert file.lookup("BOB@x.TEST") == BCRYPT
    file.set_hash("bob@x.test", ARGON2ID)
    assert file.lookup("bob@x.test") == ARGON2ID
    file.delete("alice@x.test")
    assert file.list() == ["bob@x.test"]
    with open(path) as handle:
        assert handle.read() == f"bob@x.test:{ARGON2ID}\n"


def test_refused_changes(path):
    file = UsersFile(path)
    file.add("bob@x.test", BCRYPT)
    with pytest.raises(AlreadyExists, match="bob@x.test already exists"):
        file.add("BOB@x.test", BCRYPT)
    with pytest.raises(NotFound):
        file.set_hash("nobody@x.test", BCRYPT)
    with pytest.raises(NotFound):
        file.delete("nobody@x.test")
    with pytest.raises(UsersError, match="unknown hash format"):
        file.add("carol@x.test", "plaintext")
    with pytest.raises(UsersError, match="unknown hash format"):
        file.add("carol@x.test", "$2b$04$x\nevil@x.test:$2b$")
    assert file.list() == ["bob@x.test"]


def test_writes_are_atomic_private_and_leave_no_temporary_files(path, tmp_path):
    file = UsersFile(path)
    file.add("bob@x.test", BCRYPT)
    file.set_hash("bob@x.test", BCRYPT)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["users", "users.lock"]


def test_parent_directory_is_created(tmp_path):
    file = UsersFile(str(tmp_path / "new" / "users"))
    file.add("bob@x.test", BCRYPT)
    assert file.list() == ["bob@x.test"]


def test_comments_blank_and_malformed_lines(path, logged):
    with open(path, "w") as handle:
        handle.write(f"# the users\n\nalice@x.test:{BCRYPT}\nno hash here\n"
                     f"carol@x.test:plaintext\nalice@x.test:{ARGON2ID}\n"
                     f"dave@x.test:{ARGON2ID}\n")
    file = UsersFile(path)
    assert file.list() == ["alice@x.test", "dave@x.test"]
    assert file.lookup("alice@x.test") == BCRYPT        # the first entry counts
    warnings = [e for e in logged if e.get("log_namespace") == "mailappliance.users"]
    assert [e["line"] for e in warnings] == [4, 5, 6]
    file.add("erin@x.test", BCRYPT)                      # rewrite keeps the rest
    with open(path) as handle:
        text = handle.read()
    assert text.startswith("# the users\n\n") and "no hash here\n" in text
    assert text.endswith(f"erin@x.test:{BCRYPT}\n")


def test_reload_on_change_seen_by_a_running_reader(path, collected):
    clock = task.Clock()
    server = UsersFile(path, clock=clock)
    assert server.lookup("bob@x.test") is None
    UsersFile(path).add("bob@x.test", BCRYPT)          # the CLI, elsewhere
    assert server.lookup("bob@x.test") is None          # checked < 1 s ago
    clock.advance(1.0)
    assert server.lookup("bob@x.test") == BCRYPT
    UsersFile(path).delete("bob@x.test")
    clock.advance(1.0)
    assert server.lookup("bob@x.test") is None
    assert [r["count"] for r in collected.named("users.reloaded")][-2:] == [1, 0]


def test_no_reread_when_unchanged(path, collected):
    UsersFile(path).add("bob@x.test", BCRYPT)
    clock = task.Clock()
    server = UsersFile(path, clock=clock)
    for _ in range(3):
        server.lookup("bob@x.test")
        clock.advance(2)
    assert len(collected.named("users.reloaded")) == 1


def test_edit_in_place_is_noticed(path):
    UsersFile(path).add("bob@x.test", BCRYPT)
    clock = task.Clock()
    server = UsersFile(path, clock=clock)
    assert server.list() == ["bob@x.test"]
    with open(path, "a") as handle:                     # same inode, new size
        handle.write(f"carol@x.test:{BCRYPT}\n")
    clock.advance(1)
    assert server.list() == ["bob@x.test", "carol@x.test"]


def test_concurrent_writers_lose_nothing(path):
    script = ("import sys; from appliance.auth.users import UsersFile\n"
              "f = UsersFile(sys.argv[1])\n"
              "for i in range(5): f.add(f'u{sys.argv[2]}-{i}@x.test', sys.argv[3])\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-c", script, path, str(n), BCRYPT],
                              env=env) for n in range(6)]
    assert [p.wait(timeout=60) for p in procs] == [0] * 6
    assert len(UsersFile(path).list()) == 30


# -- check_password -----------------------------------------------------------

def test_check_password_runs_the_hash_in_a_thread(path):
    threads = SyncThreads()
    file = UsersFile(path, run_in_thread=threads)
    file.add("bob@x.test", BCRYPT)
    file.add("alice@x.test", ARGON2ID)
    assert result(file.check_password("Bob@x.test", "s3cret")) is True
    assert result(file.check_password("bob@x.test", "wrong")) is False
    assert result(file.check_password("alice@x.test", "s3cret")) is True
    assert threads.calls == ["verify_password"] * 3


def test_check_password_empty_is_false_without_hashing(path):
    threads = SyncThreads()
    file = UsersFile(path, run_in_thread=threads)
    file.add("bob@x.test", BCRYPT)
    assert result(file.check_password("bob@x.test", "")) is False
    assert threads.calls == []


def test_check_password_unknown_user_costs_a_hash_and_fails(path):
    threads = SyncThreads()
    file = UsersFile(path, run_in_thread=threads)
    assert result(file.check_password("nobody@x.test", "s3cret")) is False
    assert result(file.check_password("not an address", "s3cret")) is False
    assert threads.calls == ["_verify_unknown_user"] * 2


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_root_writes_keep_the_owner_the_server_runs_as(tmp_path):
    home = tmp_path / "state"
    home.mkdir()
    os.chown(home, 4321, 4321)
    file = UsersFile(str(home / "users"))
    file.add("bob@x.test", BCRYPT)                      # new: the directory's owner
    owners = {name: (os.stat(home / name).st_uid, os.stat(home / name).st_gid)
              for name in ("users", "users.lock")}
    assert owners == {"users": (4321, 4321), "users.lock": (4321, 4321)}
    os.chown(home / "users", 1234, 1234)
    file.add("carol@x.test", BCRYPT)                    # replaced: the old owner
    assert os.stat(home / "users").st_uid == 1234


def test_passwords_with_undecodable_bytes_round_trip():
    password = b"caf\xe9".decode("utf-8", "surrogateescape")
    hashed = hash_password(password)
    assert verify_password(password, hashed)
    assert not verify_password("café", hashed)


class CountingThread:
    """A synchronous stand-in for deferToThread that counts hash checks."""

    def __init__(self):
        self.calls = 0

    def __call__(self, function, *args):
        self.calls += 1
        return defer.maybeDeferred(function, *args)


def cheap_hash(password):
    """A cost-4 bcrypt hash: for tests of the cache, not of the hash."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def _cached_users(tmp_path, clock):
    from appliance.auth.users import UsersFile
    runner = CountingThread()
    users = UsersFile(str(tmp_path / "users"), clock=clock, run_in_thread=runner)
    users.add("amy@x.test", cheap_hash("right-pw"))
    return users, runner


def _result(d):
    out = []
    d.addCallback(out.append)
    return out[0]


def test_verified_login_is_cached_but_failures_are_not(tmp_path):
    clock = task.Clock()
    users, runner = _cached_users(tmp_path, clock)
    assert _result(users.check_password("amy@x.test", "right-pw")) is True
    assert _result(users.check_password("amy@x.test", "right-pw")) is True
    assert runner.calls == 1                      # second login: no bcrypt
    assert _result(users.check_password("amy@x.test", "wrong")) is False
    assert _result(users.check_password("amy@x.test", "wrong")) is False
    assert runner.calls == 3                      # every failure pays the hash
    clock.advance(301)                               # past the TTL
    assert _result(users.check_password("amy@x.test", "right-pw")) is True
    assert runner.calls == 4


def test_password_change_voids_the_cache_at_once(tmp_path):
    from appliance.auth.users import UsersFile
    clock = task.Clock()
    users, runner = _cached_users(tmp_path, clock)
    assert _result(users.check_password("amy@x.test", "right-pw")) is True
    UsersFile(users.path).set_hash("amy@x.test", cheap_hash("new-pw"))
    clock.advance(2)                                 # the file is re-read
    assert _result(users.check_password("amy@x.test", "right-pw")) is False
    assert _result(users.check_password("amy@x.test", "new-pw")) is True
