"""The admin shell's user commands with ``[auth] backend = ldap``, end to end:
the real server on a real slapd (tests/ldap_server.py, StartTLS), the real
OpenSSH client, tmux and ``mailappliance`` over the control socket."""

import json
import shutil
import subprocess
import time

import pytest

from harness import wait_until
from test_admin_doors import PtyDoor
from test_admin_ssh import Admin, make_key

pytestmark = pytest.mark.skipif(
    not (shutil.which("ssh") and shutil.which("ssh-keygen")),
    reason="needs the OpenSSH client (.ci/run installs openssh-client)")

ALICE = "alice@example.test"
LISTED = [ALICE, "bob@example.test", "carol@example.org", "twin@example.test"]


@pytest.fixture
def ldap_admin(mailserver_factory, own_slapd, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    key = make_key(keys, "admin")
    server = mailserver_factory(start=False, users=(), overrides={
        "auth": own_slapd.auth_section("starttls"),
        "limits": {"allow": "127.0.0.1"},
    })
    (server.data_dir / "admin_authorized_keys").write_text((keys / "admin.pub").read_text())
    server.start()
    server.admin = Admin(server, key)
    server.slapd = own_slapd
    return server


def test_user_list_and_show_through_ssh_and_the_control_socket(ldap_admin):
    admin = ldap_admin.admin
    listed = admin.run("user", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["address"] for r in rows] == LISTED
    assert rows[0]["alternates"] == ["postmaster@example.test", "alice.smith@example.test"]
    shown = admin.run("user", "show", "postmaster@example.test")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == [
        f"user:       {ALICE}",
        f"entry:      uid=alice,ou=people,dc=example,dc=test ({ldap_admin.slapd.ldap_url})"]
    wild = admin.run("user", "show", "*@example.test")
    assert wild.returncode == 1 and "no such user" in wild.stderr and wild.stdout == ""
    refused = admin.run("user", "passwd", ALICE, "--password-stdin", stdin="x\n")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "managed there" in refused.stderr
    # mailappliance on the machine: through the control socket of the server
    local = ldap_admin.cli("user", "list")
    assert local.returncode == 0, local.stderr
    assert [line.split()[0] for line in local.stdout.splitlines()] == LISTED
    modes = wait_until(lambda: [(e["command"], e["mode"]) for e in
                                ldap_admin.events("admin.command")
                                if e["mode"] == "socket"], 5, what="the socket's command")
    assert modes == [("user list", "socket")]


def test_a_hung_directory_is_a_clear_error_within_the_timeouts(ldap_admin):
    admin = ldap_admin.admin
    assert admin.run("user", "list").returncode == 0
    ldap_admin.slapd.pause()
    try:
        started = time.monotonic()
        hung = subprocess.Popen(["ssh", *admin.options(), "admin@127.0.0.1", "user", "list"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)                     # the search now waits on the frozen slapd
        asked = time.monotonic()
        status = admin.run("status")        # meanwhile the server answers the rest
        status_took = time.monotonic() - asked
        still_waiting = hung.poll() is None
        out, err = hung.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        ldap_admin.slapd.resume()
    assert hung.returncode == 1 and out == ""
    assert err.startswith(f"error: the LDAP directory {ldap_admin.slapd.ldap_url} "
                          "did not answer: ") and err.count("\n") == 1
    assert elapsed < 20                     # socket timeouts 5 s, deadline 15 s
    assert status.returncode == 0 and still_waiting
    assert status_took < 5                  # an ssh process, key exchange included
    assert admin.run("user", "list").returncode == 0      # back once it answers


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux")
def test_tab_completes_ldap_user_names(ldap_admin, tmp_path):
    pty = PtyDoor(ldap_admin, tmp_path)
    try:
        # The session's start fetched the names in the background; Tab
        # offers what has arrived (tried again while it has not).
        def completed():
            pty.keys("C-c", "user show ca", "Tab")
            try:
                return wait_until(lambda: "user show carol@example.org " in pty.screen(), 1,
                                  interval=0.1, what="carol's address completed")
            except TimeoutError:
                return False
        wait_until(completed, 10, interval=0.2, what="Tab to complete")
        pty.keys("Enter")
        wait_until(lambda: "user:       carol@example.org" in pty.screen(), 10,
                   interval=0.1, what="user show's answer")
    finally:
        pty.close()
