"""``user list`` / ``user show`` with ``[auth] backend = ldap`` against a real
slapd (tests/ldap_server.py), ``user show`` with the users file, and the
LDAP refusals of ``user add/del/passwd``.

The LDAP client runs in the test's thread (``synchronous_runner``), so each
command has finished when ``dispatch`` returns, except where a test holds
the answers on purpose (the deadline on a ``Clock``).
"""

import json
import os
import time

import pytest
from twisted.internet import defer, task

import ldap_server
from test_commands import FakeEntry, FakeQueue, FakeState
from appliance.admin.commands import (Context, Identity, Sink, complete, dispatch,
                                      prepare_completion)
from appliance.admin.suspend import Suspensions
from appliance.admin.userinfo import LdapUsers, mailbox_usage
from appliance.directory import AliasesFile, Directory, recipient_accounts
from appliance.maildir import maildir_path
from appliance.testing import HandRunner, capture_events, make_config, value_of
from appliance.threads import synchronous_runner

ALICE = "alice@example.test"


def ldap_config(server, tmp_path):
    auth = server.auth_section("starttls")
    return make_config(str(tmp_path), auth=auth,
                       server={"domains": "example.test, example.org",
                               "data_dir": str(tmp_path / "data")})


class Run:
    """The command set over an LDAP backend, as the server wires it (the
    directory's recipient accounts), but every LDAP call in this thread."""

    def __init__(self, server, tmp_path, runner=synchronous_runner, clock=None,
                 timeout=2.0, limit=None):
        self.cfg = ldap_config(server, tmp_path)
        (tmp_path / "data").mkdir(exist_ok=True)
        self.aliases = AliasesFile(str(tmp_path / "data" / "aliases"))
        self.suspensions = Suspensions(str(tmp_path / "data" / "suspended"))
        self.clock = clock or task.Clock()
        accounts = recipient_accounts(self.cfg, runner, clock=clock, timeout=timeout)
        self.ldap = LdapUsers(accounts, self.clock, **({"limit": limit} if limit else {}))
        self.directory = Directory(self.cfg, None, self.aliases)

    queue = None

    def context(self, out, err, role="admin"):
        return Context(self.cfg, Sink(out.append, err.append, 120), users=None,
                       aliases=self.aliases, directory=self.directory,
                       suspensions=self.suspensions, queue=self.queue,
                       state=FakeState() if self.queue is not None else None,
                       identity=Identity("root", "SHA256:abc", role, "127.0.0.9", "exec"),
                       read_secret=lambda prompt: "pw", audit=True, clock=self.clock,
                       ldap_users=self.ldap)

    def start(self, *argv):
        out, err = [], []
        return dispatch(list(argv), self.context(out, err)), out, err

    def __call__(self, *argv):
        d, out, err = self.start(*argv)
        return value_of(d), out, err


def test_user_list_reads_the_directory(slapd, tmp_path):
    run = Run(slapd, tmp_path)
    rc, out, err = run("user", "list")
    assert (rc, err) == (0, [])
    assert out == [
        "alice@example.test  (also: postmaster@example.test, alice.smith@example.test)",
        "bob@example.test", "carol@example.org", "twin@example.test"]
    run.suspensions.suspend("bob@example.test", 1000.0)
    rows = json.loads(run("user", "list", "--json")[1][0])
    assert rows[0] == {"address": ALICE, "suspended": False,
                       "alternates": ["postmaster@example.test", "alice.smith@example.test"]}
    assert [r["address"] for r in rows if r["suspended"]] == ["bob@example.test"]
    rc, out, _ = run("user", "list", "--domain", "Example.ORG")
    assert (rc, out) == (0, ["carol@example.org"])


def test_user_list_is_bounded_and_says_so(slapd, tmp_path):
    run = Run(slapd, tmp_path, limit=2)
    rc, out, err = run("user", "list")
    assert rc == 0 and out == [
        "alice@example.test  (also: postmaster@example.test, alice.smith@example.test)",
        "bob@example.test"]
    assert err == [f"warning: only the first 2 accounts of {slapd.ldap_url} are listed"]


def test_the_directorys_own_size_limit_is_said_not_hidden(tmp_path):
    """slapd answers at most 500 entries to a search by default (sizelimit):
    the listing says it was cut instead of passing for the whole directory."""
    users = {f"u{n}": ("pw", [f"u{n:04d}@example.test"], []) for n in range(520)}
    with ldap_server.SlapdServer(tmp_path / "slapd", users=users) as server:
        run = Run(server, tmp_path)
        rc, out, err = run("user", "list")
    assert rc == 0 and len(out) == 500 and out[0] == "u0000@example.test"
    assert err == [f"warning: {server.ldap_url} ended the listing after 500 accounts with "
                   "its own size limit: there may be more (raise the limit for [auth] "
                   "ldap_bind_dn, e.g. OpenLDAP's limits size.prtotal)"]


def test_user_show_by_any_address(slapd, tmp_path):
    run = Run(slapd, tmp_path)
    run.aliases.add("sales@example.test", ["alice.smith@example.test", "bob@example.test"])
    box = maildir_path(str(tmp_path / "data" / "mail"), ALICE)
    for sub in ("new", "cur", "tmp", ".Sent/cur"):
        os.makedirs(os.path.join(box, sub))
    open(os.path.join(box, ".Sent", "maildirfolder"), "w").close()
    for name, data in (("new/1", b"x" * 100), ("cur/2:2,S", b"y" * 50),
                       ("tmp/3", b"in progress"), (".Sent/cur/4:2,S", b"z" * 10)):
        with open(os.path.join(box, name), "wb") as f:
            f.write(data)
    run.suspensions.suspend(ALICE, run.clock.seconds() - 7200)
    rc, out, err = run("user", "show", "Postmaster@Example.TEST", "--json")
    assert (rc, err) == (0, [])
    info = json.loads(out[0])
    assert info == {
        "address": ALICE, "backend": "ldap", "dn": ldap_server.user_dn("alice"),
        "alternates": ["postmaster@example.test", "alice.smith@example.test"],
        "suspended_since": run.clock.seconds() - 7200,
        "aliases": [{"address": "sales@example.test",
                     "targets": ["alice.smith@example.test", "bob@example.test"]}],
        "mailbox": {"path": box, "exists": True, "messages": 3, "bytes": 160, "folders": 1,
                    "complete": True}}
    rc, out, _ = run("user", "show", "bob@example.test")
    assert rc == 0
    assert out == ["user:       bob@example.test",
                   f"entry:      {ldap_server.user_dn('bob')} ({slapd.ldap_url})",
                   "alias:      sales@example.test -> alice.smith@example.test, "
                   "bob@example.test",
                   "suspended:  no",
                   "mailbox:    empty (nothing delivered yet)"]


def test_user_show_unknown_ambiguous_and_filter_metacharacters(slapd, tmp_path):
    run = Run(slapd, tmp_path)
    rc, out, err = run("user", "show", "nobody@example.test")
    assert (rc, out) == (1, [])
    assert err == [f"error: nobody@example.test: no such user in {slapd.ldap_url}"]
    rc, _, err = run("user", "show", "twin@example.test")
    assert rc == 1 and err[0].startswith("error: twin@example.test: ambiguous") \
        and ldap_server.user_dn("twin1") in err[0] and ldap_server.user_dn("twin2") in err[0]
    # A wildcard in the name is a literal '*': it matches nobody.
    for name in ("*@example.test", "al*@example.test", "*"):
        rc, out, err = run("user", "show", name)
        assert rc == 1 and out == [] and len(err) == 1, name
    # Names that are no address never reach the directory.
    for name in ("x)(mail=*@example.test", "a\\2a@example.test", "(uid=*)"):
        rc, out, err = run("user", "show", name)
        assert rc == 1 and out == [] and "not an address" in err[0], name


def test_filter_input_is_escaped_in_the_search(slapd, tmp_path):
    """Below the address check: what reaches the filter is escaped (RFC 4515)."""
    cfg = ldap_config(slapd, tmp_path)
    client = recipient_accounts(cfg, synchronous_runner, timeout=2.0)._client
    assert [e["dn"] for e in client.entries(ALICE)] == [ldap_server.user_dn("alice")]
    for raw in ("*", "alice@example.tes*", "*)(uid=alice", "x)(|(mail=*", "\\2a",
                "alice@example.test)(mail=*", "\\"):
        assert client.entries(raw) == [], raw


def test_suspend_and_resume_by_any_address_apply_to_the_entry(slapd, tmp_path):
    run = Run(slapd, tmp_path)
    run.queue = FakeQueue(FakeEntry("aa01", ALICE, ["x@remote.example"]))
    rc, out, _ = run("user", "suspend", "Alice.Smith@example.test")
    assert rc == 0 and out == [f"suspended: {ALICE} (logins refused; 1 queued messages held)"]
    assert list(run.suspensions.list()) == [ALICE]
    rc, _, err = run("user", "suspend", "nobody@example.test")
    assert rc == 1 and "no such user" in err[0]
    rc, out, _ = run("user", "resume", "postmaster@example.test")
    assert rc == 0 and out == [f"resumed: {ALICE} (1 messages released)"]
    assert run.suspensions.list() == {}


def test_user_add_del_passwd_say_the_directory_is_managed_elsewhere(slapd, tmp_path):
    run = Run(slapd, tmp_path)
    for verb in ("add", "del", "passwd"):
        rc, out, err = run("user", verb, "new@example.test")
        assert (rc, out) == (1, [])
        assert err == [f"error: user {verb}: the users live in the LDAP directory "
                       f"{slapd.ldap_url} ([auth] backend = ldap) and are managed there; "
                       "here user list and user show read it"]


def test_tab_completes_user_names_from_the_directory(slapd, tmp_path):
    """Tab is synchronous: it offers the last listing, fetched in the
    background when missing or older than a minute (one fetch at a time)."""
    runner = HandRunner()
    run = Run(slapd, tmp_path, runner=runner)
    ctx = run.context([], [])
    prepare_completion(ctx)                 # the session starts: a fetch begins
    assert complete(ctx, ["user", "show"], "a") == [] and len(runner.calls) == 1
    runner.release()
    assert complete(ctx, ["user", "show"], "a") == [ALICE]
    assert complete(ctx, ["user", "suspend"], "") == [
        ALICE, "bob@example.test", "carol@example.org", "twin@example.test"]
    assert runner.count == 1                # fresh: no new search
    run.clock.advance(61)
    assert complete(ctx, ["user", "show"], "b") == ["bob@example.test"]    # the old list
    assert len(runner.calls) == 1           # ... while a new one is fetched
    runner.release()


def test_a_stopped_directory_is_a_clear_error(own_slapd, tmp_path):
    run = Run(own_slapd, tmp_path, timeout=1.0)
    assert run("user", "list")[0] == 0
    own_slapd.stop()
    with capture_events() as seen:
        rc, out, err = run("user", "list")
        assert (rc, out) == (1, [])
        assert err[0].startswith(f"error: the LDAP directory {own_slapd.ldap_url} did not "
                                 "answer: ") and len(err) == 1
        rc, _, err = run("user", "show", ALICE)
        assert rc == 1 and "did not answer" in err[0]
    assert seen.named("ldap.unavailable")
    assert seen.named("admin.command")[0]["rc"] == 1


def test_a_hung_directory_answers_within_the_socket_timeouts(own_slapd, tmp_path):
    run = Run(own_slapd, tmp_path, timeout=1.0)
    assert run("user", "list")[0] == 0      # a pooled connection, then slapd freezes
    own_slapd.pause()
    try:
        started = time.monotonic()
        rc, out, err = run("user", "list")
        elapsed = time.monotonic() - started
    finally:
        own_slapd.resume()
    assert (rc, out) == (1, []) and "did not answer" in err[0]
    assert elapsed < 6.0            # a receive timeout on the pooled one, then a fresh one


def test_a_hung_directory_meets_the_deadline_on_the_reactor(slapd, tmp_path):
    """In the server the LDAP work runs on a pool: the deadline on the
    reactor's clock ends the command even while the thread still waits."""
    held = []

    def never(f, *args):
        d = defer.Deferred()
        held.append(d)
        return d
    clock = task.Clock()
    run = Run(slapd, tmp_path, runner=never, clock=clock, timeout=1.0)
    d, out, err = run.start("user", "list")
    assert not d.called and len(held) == 1
    clock.advance(3.0)                      # 3 x timeout
    assert value_of(d) == 1 and out == []
    assert err == [f"error: the LDAP directory {slapd.ldap_url} did not answer: "
                   "no answer within 3s"]


def test_the_offline_cli_reads_the_directory_itself(slapd, tmp_path):
    from test_cli import cli_main
    path = tmp_path / "ldap.ini"
    auth = "".join(f"{k} = {v}\n" for k, v in slapd.auth_section("starttls").items())
    path.write_text(f"[server]\nhostname = m.example.test\ndomains = example.test\n"
                    f"data_dir = {tmp_path / 'data'}\n[auth]\n{auth}")
    code, out, err = cli_main("user", "list", "--json", "--config", str(path))
    assert (code, err) == (0, "")
    assert [r["address"] for r in json.loads(out)][:2] == [ALICE, "bob@example.test"]
    code, out, err = cli_main("user", "show", "alice.smith@example.test", "--config",
                              str(path))
    assert code == 0 and out.splitlines()[0] == f"user:       {ALICE}"
    code, out, err = cli_main("user", "add", "x@example.test", "--password-stdin",
                              "--config", str(path))
    assert code == 1 and out == "" and err.count("\n") == 1 and "managed there" in err


def test_user_show_with_the_users_file(tmp_path):
    cfg = make_config(str(tmp_path), server={"domains": "example.test",
                                             "data_dir": str(tmp_path / "data")})
    directory = Directory.from_config(cfg)
    suspensions = Suspensions(str(tmp_path / "suspended"))
    out, err = [], []
    ctx = Context(cfg, Sink(out.append, err.append), users=directory.users,
                  aliases=directory.aliases, directory=directory, suspensions=suspensions,
                  read_secret=lambda prompt: "pw")
    assert value_of(dispatch(["user", "add", "bob@example.test"], ctx)) == 0
    directory.aliases.add("info@example.test", ["bob@example.test"])
    del out[:]
    assert value_of(dispatch(["user", "show", "BOB@example.test", "--json"], ctx)) == 0
    info = json.loads(out[0])
    assert info["address"] == "bob@example.test" and info["backend"] == "file"
    assert info["aliases"] == [{"address": "info@example.test",
                                "targets": ["bob@example.test"]}]
    assert info["suspended_since"] is None and info["mailbox"]["exists"] is False
    assert value_of(dispatch(["user", "show", "nobody@example.test"], ctx)) == 1
    assert err == ["error: nobody@example.test does not exist"]


def test_mailbox_usage_stops_counting_at_its_limit(tmp_path):
    box = maildir_path(str(tmp_path), ALICE)
    os.makedirs(os.path.join(box, "cur"))
    for n in range(5):
        with open(os.path.join(box, "cur", str(n)), "wb") as f:
            f.write(b"abc")
    assert mailbox_usage(str(tmp_path), ALICE, limit=3)["complete"] is False
    full = mailbox_usage(str(tmp_path), ALICE)
    assert (full["messages"], full["bytes"], full["complete"]) == (5, 15, True)


@pytest.mark.parametrize("verb", ["list", "show"])
def test_a_read_only_key_may_read_the_directory(slapd, tmp_path, verb):
    run = Run(slapd, tmp_path)
    out, err = [], []
    argv = ["user", verb] + ([ALICE] if verb == "show" else [])
    assert value_of(dispatch(argv, run.context(out, err, role="read"))) == 0
    assert out and not err
