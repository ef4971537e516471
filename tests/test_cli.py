"""The mailappliance command line: happy paths and one-line errors."""

import io
import os
import subprocess
import sys

import bcrypt
import pytest

from appliance import cli
from appliance.auth.users import UsersFile, verify_password

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "etc", "mailappliance.ini")

CONFIG = """\
[server]
hostname = mail.example.test
domains = example.test, example.org
data_dir = {data}
[auth]
users_file = {data}/users
"""


class Run:
    """Runs ``main`` in-process with fake stdin/stdout/stderr/getpass."""

    def __init__(self, config_path):
        self.config = config_path
        self.prompts = []

    def __call__(self, *argv, stdin="", passwords=(), config=True):
        answers = list(passwords)

        def fake_getpass(prompt):
            self.prompts.append(prompt)
            return answers.pop(0)
        streams = cli.IO(stdin=io.StringIO(stdin), stdout=io.StringIO(),
                         stderr=io.StringIO(), getpass=fake_getpass)
        args = list(argv) + (["--config", self.config] if config else [])
        code = cli.main(args, streams)
        return code, streams.stdout.getvalue(), streams.stderr.getvalue()


@pytest.fixture
def data(tmp_path):
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def cheap_bcrypt(monkeypatch):
    """``user add`` / ``passwd`` hash at bcrypt cost 4 here: these tests check the
    command line, tests/test_users.py the hashing (test_subprocess_round_trip, in
    its own process, still pays the full cost)."""
    gensalt = bcrypt.gensalt
    monkeypatch.setattr(bcrypt, "gensalt", lambda rounds=4, prefix=b"2b": gensalt(4, prefix))


@pytest.fixture
def run(tmp_path, data):
    path = tmp_path / "m.ini"
    path.write_text(CONFIG.format(data=data))
    return Run(str(path))


def users(data):
    return UsersFile(str(data / "users"))


# -- check-config -------------------------------------------------------------

def test_check_config_ok(run):
    assert run("check-config") == (0, f"config OK: {run.config}\n", "")


def test_check_config_sample():
    code, out, err = cli_main("check-config", "--config", SAMPLE)
    assert (code, out, err) == (0, f"config OK: {SAMPLE}\n", "")


def test_check_config_problems_one_line_each(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[server]\ndomains = example.test\n[limits]\nban_time = 1x\n"
                   "[lsiten]\n")
    code, out, err = cli_main("--config", str(bad), "check-config")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        'mailappliance: [lsiten]: unknown section (did you mean "listen"?)',
        'mailappliance: [limits] ban_time: "1x" is not a duration (use 30s, 5m, 2h, 5d)',
        "mailappliance: [server] hostname: must be set (the banner and EHLO name)",
    ]


def test_missing_config_is_one_line(tmp_path):
    code, out, err = cli_main("user", "list", "--config", str(tmp_path / "no.ini"))
    assert (code, err) == (2, f"mailappliance: {tmp_path / 'no.ini'}: no such file\n")


def cli_main(*argv):
    streams = cli.IO(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    code = cli.main(list(argv), streams)
    return code, streams.stdout.getvalue(), streams.stderr.getvalue()


# -- usage ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    ([], "a command is required"),
    (["frob"], "unknown command 'frob'"),
    (["user"], "user: which one? add, del"),
    (["user", "add"], "the following arguments are required: ADDRESS"),
    (["alias", "add", "x@example.test"], "the following arguments are required: TARGET"),
    (["dns-records", "extra"], "unrecognized arguments: extra"),
    (["check-config", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(argv, fragment):
    code, out, err = cli_main(*argv)
    assert code == 2 and out == ""
    assert err.startswith("mailappliance: ") and fragment in err
    assert err.count("\n") == 1


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "check-config" in capsys.readouterr().out


def test_default_config_path():
    assert cli.parse_args(["user", "list"]).config == cli.DEFAULT_CONFIG
    assert cli.parse_args(["--config", "a", "user", "list"]).config == "a"
    assert cli.parse_args(["user", "--config", "b", "list"]).config == "b"
    assert cli.parse_args(["user", "list", "--config", "c"]).config == "c"


# -- users ----------------------------------------------------------------------

def test_user_add_from_stdin_then_list(run, data):
    assert run("user", "add", "Alice@Example.TEST", "--password-stdin",
               stdin="s3cret\n") == (0, "user added: alice@example.test\n", "")
    assert verify_password("s3cret", users(data).lookup("alice@example.test"))
    assert run("user", "add", "bob@example.org", "--password-stdin",
               stdin="pw with spaces \r\n")[0] == 0
    assert verify_password("pw with spaces ", users(data).lookup("bob@example.org"))
    assert run("user", "list") == (0, "alice@example.test\nbob@example.org\n", "")


def test_user_add_prompts_twice(run, data):
    assert run("user", "add", "carol@example.test", passwords=["pw1", "pw1"])[0] == 0
    assert run.prompts == ["Password: ", "Password (again): "]
    assert verify_password("pw1", users(data).lookup("carol@example.test"))


def test_user_add_refusals(run, data):
    run("user", "add", "alice@example.test", "--password-stdin", stdin="pw\n")
    assert run("user", "add", "ALICE@example.test", "--password-stdin", stdin="x\n") \
        == (1, "", "mailappliance: alice@example.test already exists\n")
    assert run("user", "add", "eve@elsewhere.test", "--password-stdin", stdin="x\n") \
        == (1, "", "mailappliance: elsewhere.test is not one of the local domains "
                   "([server] domains)\n")
    assert run("user", "add", "dave@example.test", "--password-stdin", stdin="\n") \
        == (1, "", "mailappliance: empty password refused\n")
    assert run("user", "add", "dave@example.test", passwords=["a", "b"]) \
        == (1, "", "mailappliance: the two passwords differ\n")
    code, _, err = run("user", "add", "not-an-address", "--password-stdin", stdin="x\n")
    assert code == 1 and err.startswith("mailappliance: 'not-an-address' is not an")
    assert run("user", "add", "@example.test", "--password-stdin", stdin="x\n")[0] == 1
    assert users(data).list() == ["alice@example.test"]


def test_user_add_if_missing_leaves_an_existing_user_alone(run, data):
    assert run("user", "add", "alice@example.test", "--if-missing", "--password-stdin",
               stdin="first\n") == (0, "user added: alice@example.test\n", "")
    # Again (the README's set-up line, rerun): no prompt, the password stays.
    assert run("user", "add", "Alice@example.test", "--if-missing",
               passwords=[]) == (0, "user exists, unchanged: alice@example.test\n", "")
    assert run("user", "add", "alice@example.test", "--if-missing", "--password-stdin",
               stdin="second\n")[0] == 0
    assert run.prompts == []
    assert verify_password("first", users(data).lookup("alice@example.test"))
    assert users(data).list() == ["alice@example.test"]
    # Everything else is checked as without it.
    assert run("user", "add", "eve@elsewhere.test", "--if-missing", "--password-stdin",
               stdin="x\n")[0] == 1
    assert run("user", "add", "bob@example.test", "--if-missing", "--password-stdin",
               stdin="\n") == (1, "", "mailappliance: empty password refused\n")


def test_user_passwd_and_del(run, data):
    run("user", "add", "alice@example.test", "--password-stdin", stdin="old\n")
    assert run("user", "passwd", "alice@example.test", "--password-stdin",
               stdin="new\n") == (0, "password changed: alice@example.test\n", "")
    assert verify_password("new", users(data).lookup("alice@example.test"))
    assert run("user", "passwd", "bob@example.test", "--password-stdin", stdin="x\n") \
        == (1, "", "mailappliance: bob@example.test does not exist\n")
    assert run("user", "del", "alice@example.test") == \
        (0, "user deleted: alice@example.test\n", "")
    assert run("user", "del", "alice@example.test") == \
        (1, "", "mailappliance: alice@example.test does not exist\n")
    assert run("user", "list") == (0, "", "")


def test_user_commands_with_ldap_backend(tmp_path):
    """With LDAP and no server running, user list asks the directory from
    this process (here nobody answers: one line); user add is refused."""
    path = tmp_path / "ldap.ini"
    path.write_text("[server]\nhostname = m.example.test\ndomains = example.test\n"
                    f"data_dir = {tmp_path / 'data'}\n"
                    "[auth]\nbackend = ldap\nldap_url = ldap://127.0.0.1:9\n"
                    "ldap_starttls = off\nldap_base_dn = dc=example,dc=test\n")
    code, out, err = cli_main("user", "list", "--config", str(path))
    assert (code, out) == (1, "")
    assert err.startswith("mailappliance: the LDAP directory ldap://127.0.0.1:9 did not "
                          "answer: ") and err.count("\n") == 1
    code, out, err = cli_main("user", "add", "a@example.test", "--config", str(path))
    assert (code, out) == (1, "")
    assert err == ("mailappliance: user add: the users live in the LDAP directory "
                   "ldap://127.0.0.1:9 ([auth] backend = ldap) and are managed there; "
                   "here user list and user show read it\n")


def test_operational_os_error_is_one_line(run, data):
    data.mkdir()
    (data / "users").mkdir()           # a directory where the file should be
    code, out, err = run("user", "add", "alice@example.test", "--password-stdin",
                         stdin="pw\n")
    assert code == 1 and out == ""
    assert err.startswith("mailappliance: ") and err.count("\n") == 1


def test_unexpected_errors_are_one_line(run, monkeypatch):
    def explode(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(cli.commands, "offline_context", explode, raising=False)
    monkeypatch.setattr(cli, "offline_context", explode)
    assert run("check-config") == (1, "", "mailappliance: internal error: "
                                          "RuntimeError: boom\n")


# -- aliases ----------------------------------------------------------------------

def test_alias_add_list_del(run):
    assert run("alias", "add", "Sales@example.test", "alice@example.test",
               "ext@remote.test") == \
        (0, "alias sales@example.test: alice@example.test, ext@remote.test\n", "")
    assert run("alias", "add", "@example.org", "alice@example.test") == \
        (0, "alias @example.org: alice@example.test\n", "")
    assert run("alias", "add", "sales@example.test", "bob@example.test")[1] == \
        "alias sales@example.test: alice@example.test, ext@remote.test, bob@example.test\n"
    assert run("alias", "list") == (0, "@example.org: alice@example.test\n"
                                       "sales@example.test: alice@example.test, "
                                       "ext@remote.test, bob@example.test\n", "")
    assert run("alias", "del", "sales@example.test") == \
        (0, "alias deleted: sales@example.test\n", "")
    assert run("alias", "del", "sales@example.test") == \
        (1, "", "mailappliance: sales@example.test does not exist\n")


def test_alias_refusals(run):
    assert run("alias", "add", "x@remote.test", "alice@example.test") == \
        (1, "", "mailappliance: remote.test is not one of the local domains "
                "([server] domains)\n")
    code, _, err = run("alias", "add", "x@example.test", "bad target")
    assert code == 1 and "'bad target' is not an address" in err
    assert run("alias", "list") == (0, "", "")


# -- through a real process -----------------------------------------------------

def test_subprocess_round_trip(run, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = [sys.executable, "-m", "appliance.cli"]
    added = subprocess.run(base + ["--config", run.config, "user", "add",
                                   "alice@example.test", "--password-stdin"],
                           input="s3cret\n", capture_output=True, text=True,
                           env=env, cwd=str(tmp_path), timeout=60)
    assert (added.returncode, added.stdout, added.stderr) == \
        (0, "user added: alice@example.test\n", "")
    bad = subprocess.run(base + ["check-config", "--config", str(tmp_path / "no.ini")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == f"mailappliance: {tmp_path / 'no.ini'}: no such file\n"
