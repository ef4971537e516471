"""The admin shell end to end: the real server, the real OpenSSH client
(ssh, ssh-keygen), ssh-audit and tmux, all on loopback."""

import json
import shutil
import smtplib
import socket
import subprocess
import time

import pytest

from harness import wait_until

pytestmark = pytest.mark.skipif(
    not (shutil.which("ssh") and shutil.which("ssh-keygen")),
    reason="needs the OpenSSH client (.ci/run installs openssh-client)")

REMOTE = "someone@remote.example"


def make_key(directory, name, kind="ed25519"):
    path = directory / name
    args = ["ssh-keygen", "-q", "-N", "", "-C", name, "-f", str(path), "-t", kind]
    if kind == "rsa":
        args += ["-b", "2048"]
    subprocess.run(args, check=True, timeout=60)
    return path


class Admin:
    """ssh to the server's admin port with one key."""

    def __init__(self, server, key, source="127.0.0.1"):
        self.server = server
        self.key = key
        self.source = source

    def options(self, *extra):
        # ssh takes the first value of an option: ``extra`` comes first.
        return [*extra, "-p", str(self.server.port("admin_ssh")), "-i", str(self.key),
                "-b", self.source,
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR"]

    def run(self, *command, stdin="", extra=(), timeout=30):
        return subprocess.run(["ssh", *self.options(*extra), "admin@127.0.0.1", *command],
                              input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def admin_server(mailserver_factory, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    admin_key = make_key(keys, "admin")
    read_key = make_key(keys, "reader")
    server = mailserver_factory(start=False, overrides={
        "relay": {"trusted_networks": "127.0.0.1"},      # MX relays: mail to queue
        "limits": {"allow": "127.0.0.1"},                # many ssh runs in a row
        "admin": {"readonly_keys": str(tmp_path / "readonly_keys")},
    })
    (server.data_dir / "admin_authorized_keys").write_text(
        (keys / "admin.pub").read_text())
    (tmp_path / "readonly_keys").write_text((keys / "reader.pub").read_text())
    server.start()
    server.keys = keys
    server.admin = Admin(server, admin_key)
    server.reader = Admin(server, read_key)
    return server


def queue_remote(server, count=1, sender="friend@example.net", subject="hello"):
    """Messages for a remote domain: the MX relays for 127.0.0.1, the remote
    side is unreachable, so they stay in the queue (deferred)."""
    for n in range(count):
        body = (f"From: {sender}\r\nTo: {REMOTE}\r\nSubject: {subject}\r\n"
                f"Message-ID: <{n}.{time.time()}@example.net>\r\n\r\nbody {n}\r\n")
        with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=30) as client:
            client.sendmail(sender, [REMOTE], body.encode("utf-8"))


def queue_ids(server):
    result = server.admin.run("queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    return [row["queue_id"] for row in json.loads(result.stdout)]


def wait_queued(server, count):
    return wait_until(lambda: len(queue_ids(server)) >= count and queue_ids(server), 30,
                      interval=0.3, what=f"{count} queued messages")


# -- one-shot commands -----------------------------------------------------------------

def test_one_shot_commands_exit_codes_and_json(admin_server):
    admin = admin_server.admin
    status = admin.run("status")
    assert status.returncode == 0 and "mailappliance" in status.stdout
    assert status.stderr == ""
    info = json.loads(admin.run("status", "--json").stdout)
    assert info["hostname"] == "mail.example.test"
    assert {"mx", "admin_ssh"} <= {lst["name"] for lst in info["listeners"]}
    unknown = admin.run("frobnicate")
    assert unknown.returncode == 127 and unknown.stdout == ""
    assert unknown.stderr.startswith("error: unknown command 'frobnicate'")
    usage = admin.run("queue", "show")
    assert usage.returncode == 2 and "required" in usage.stderr
    missing = admin.run("queue", "show", "0123456789abcdef0123")
    assert missing.returncode == 1 and "no message" in missing.stderr
    assert json.loads(admin.run("user", "list", "--json").stdout) == [
        {"address": "alice@example.test", "suspended": False}]
    hostkey = admin.run("server", "hostkey").stdout.split()[1]
    listed = subprocess.run(["ssh-keygen", "-lf", str(admin_server.data_dir /
                                                      "ssh_host_ed25519_key")],
                            capture_output=True, text=True, timeout=30).stdout
    assert hostkey.startswith("SHA256:") and hostkey in listed
    audited = wait_until(lambda: admin_server.events("admin.command"), 5,
                         what="admin.command events")
    first = audited[0]
    assert first["command"] == "status" and first["rc"] == 0 and first["mode"] == "exec"
    assert first["key_fingerprint"].startswith("SHA256:") and first["role"] == "admin"
    assert first["user"] == "admin" and first["peer_ip"] == "127.0.0.1"


def test_user_add_with_the_password_on_stdin_then_it_can_log_in(admin_server):
    admin = admin_server.admin
    added = admin.run("user", "add", "bob@example.test", "--password-stdin",
                      stdin="hunter2 is long\n")
    assert added.returncode == 0, added.stderr
    assert "user added: bob@example.test" in added.stdout
    import imaplib      # the new user logs in at once (no restart)
    if "imap" in admin_server.ports:
        with imaplib.IMAP4("127.0.0.1", admin_server.port("imap"), timeout=20) as imap:
            imap.starttls(ssl_context=admin_server.tls_context())
            assert imap.login("bob@example.test", "hunter2 is long")[0] == "OK"
    again = admin.run("user", "add", "bob@example.test", "--password-stdin", stdin="x\n")
    assert again.returncode == 1 and "already exists" in again.stderr
    time.sleep(0.2)
    commands = [e["command"] for e in admin_server.events("admin.command")]
    assert "user add bob@example.test --password-stdin" in commands
    assert not any("hunter2" in line for line in
                   admin_server.events_path.read_text().splitlines())


def test_queue_hold_release_delete_on_real_queued_mail(admin_server):
    admin = admin_server.admin
    queue_remote(admin_server, 3, sender="spammer@bad.example")
    queue_remote(admin_server, 1, sender="friend@example.net")
    ids = wait_queued(admin_server, 4)
    shown = json.loads(admin.run("queue", "show", ids[0], "--json").stdout)
    assert shown["envelope"]["sender"] == "spammer@bad.example"
    assert "Subject: hello" in shown["headers"]

    held = admin.run("queue", "hold", ids[0])
    assert held.returncode == 0 and "held: 1" in held.stdout
    rows = {r["queue_id"]: r for r in json.loads(admin.run("queue", "list", "--json").stdout)}
    assert rows[ids[0]]["held"] is True and rows[ids[1]]["held"] is False
    assert admin.run("queue", "release", ids[0]).returncode == 0
    assert not json.loads(admin.run("queue", "show", ids[0], "--json").stdout)["held"]

    # Bulk by sender: a preview and no change without --yes, then with it.
    preview = admin.run("queue", "delete", "--sender", "spammer@bad.example")
    assert preview.returncode == 1 and "3 messages match" in preview.stdout
    assert "--yes" in preview.stderr
    assert len(queue_ids(admin_server)) == 4
    deleted = admin.run("queue", "delete", "--sender", "spammer@bad.example", "--yes")
    assert deleted.returncode == 0 and "deleted: 3" in deleted.stdout
    assert queue_ids(admin_server) == [ids[3]]
    assert admin.run("queue", "delete", ids[3]).returncode == 0
    assert queue_ids(admin_server) == []
    wait_until(lambda: len(admin_server.events("queue.deleted")) == 4, 5,
               what="queue.deleted events")


def test_a_read_only_key_reads_but_cannot_delete(admin_server):
    queue_remote(admin_server, 1)
    [qid] = wait_queued(admin_server, 1)
    reader = admin_server.reader
    assert reader.run("queue", "list").returncode == 0
    refused = reader.run("queue", "delete", qid)
    assert refused.returncode == 77 and "read-only" in refused.stderr
    assert reader.run("user", "add", "x@example.test", "--password-stdin",
                      stdin="pw\n").returncode == 77
    assert queue_ids(admin_server) == [qid]
    time.sleep(0.2)
    denied = [e for e in admin_server.events("admin.command") if e["rc"] == 77]
    assert denied and all(e["role"] == "read" for e in denied)


def test_mail_data_cannot_drive_the_admin_terminal(admin_server):
    queue_remote(admin_server, 1, subject="\x1b]0;pwned\x07\x1b[2J red")
    [qid] = wait_queued(admin_server, 1)
    shown = admin_server.admin.run("queue", "show", qid).stdout
    assert "\x1b" not in shown and "\x07" not in shown
    assert "\\x1b]0;pwned\\x07\\x1b[2J red" in shown


# -- keys only, algorithms, deadlines --------------------------------------------------

def test_password_and_keyboard_interactive_are_never_offered(admin_server):
    result = subprocess.run(
        ["ssh", *admin_server.admin.options(
            "-v", "-o", "LogLevel=DEBUG", "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password,keyboard-interactive"),
         "admin@127.0.0.1", "status"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 255
    assert "Authentications that can continue: publickey\n" in result.stderr
    assert "Permission denied (publickey)" in result.stderr


@pytest.mark.parametrize("option", [
    "KexAlgorithms=diffie-hellman-group14-sha1", "KexAlgorithms=ecdh-sha2-nistp256",
    "Ciphers=aes128-cbc", "Ciphers=3des-cbc", "MACs=hmac-sha1", "MACs=hmac-md5",
    "HostKeyAlgorithms=ssh-rsa",
])
def test_weak_algorithms_are_refused(admin_server, option):
    result = admin_server.admin.run("status", extra=("-o", option, "-o", "LogLevel=INFO"))
    assert result.returncode == 255 and "no matching" in result.stderr


def test_rsa_keys_log_in_with_sha2_and_never_with_sha1(admin_server):
    rsa = make_key(admin_server.keys, "rsa", "rsa")
    path = admin_server.data_dir / "admin_authorized_keys"
    path.write_text(path.read_text() + (admin_server.keys / "rsa.pub").read_text())
    admin = type(admin_server.admin)(admin_server, rsa)
    assert admin.run("status").returncode == 0          # edits apply without a restart
    sha1 = admin.run("status", extra=("-o", "PubkeyAcceptedAlgorithms=ssh-rsa"))
    assert sha1.returncode == 255


def test_unknown_key_and_from_restriction_are_failed_logins(admin_server):
    stranger = type(admin_server.admin)(admin_server, make_key(admin_server.keys, "stranger"))
    assert stranger.run("status").returncode == 255
    elsewhere = make_key(admin_server.keys, "elsewhere")
    path = admin_server.data_dir / "admin_authorized_keys"
    path.write_text(path.read_text() + 'from="10.0.0.0/8,!127.0.0.1" '
                    + (admin_server.keys / "elsewhere.pub").read_text())
    restricted = type(admin_server.admin)(admin_server, elsewhere)
    assert restricted.run("status").returncode == 255
    failed = wait_until(lambda: len(admin_server.events("admin.login_failed")) >= 2 and
                        admin_server.events("admin.login_failed"), 5, what="failed logins")
    assert {e["reason"] for e in failed} >= {"unknown key", "from= refused"}
    assert all(e["peer_ip"] == "127.0.0.1" and e["user"] == "admin" for e in failed)
    assert all(e["key_fingerprint"].startswith("SHA256:") for e in failed)
    # The auditor's admin_ssh rule: one failed login is an alert, shown by `alerts`.
    alerts = wait_until(lambda: [a for a in json.loads(
        admin_server.admin.run("alerts", "--json").stdout) if a["rule"] == "admin_ssh"], 10,
        interval=0.3, what="an admin_ssh alert")
    assert alerts[0]["peer_ip"] == "127.0.0.1" and not alerts[0]["acked"]
    acked = admin_server.admin.run("alerts", "ack", str(alerts[0]["alert_id"]))
    assert acked.returncode == 0
    assert "alert #" in admin_server.admin.run("status").stdout


def test_forwarding_and_subsystems_are_refused(admin_server):
    sftp = subprocess.run(["ssh", *admin_server.admin.options(), "-s", "admin@127.0.0.1",
                           "sftp"], capture_output=True, text=True, timeout=30)
    assert sftp.returncode != 0 and sftp.stdout == ""
    forward = admin_server.admin.run("status", extra=(
        "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{_free_port()}:127.0.0.1:22"))
    assert "mailappliance" in forward.stdout or forward.returncode == 255


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_pre_auth_deadline_closes_a_silent_connection(admin_server):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", admin_server.port("admin_ssh")),
                                  timeout=40) as sock:
        assert sock.recv(64).startswith(b"SSH-2.0-mailappliance")
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:        # the server aborts: a reset is a close
            pass
    assert 15 < time.monotonic() - started < 30


def test_connection_rate_per_ip_is_capped(admin_server):
    # 127.0.0.2 is not in [limits] allow: at most 10 new connections per 10 s.
    outcomes = []
    for _ in range(12):
        with socket.create_connection(("127.0.0.1", admin_server.port("admin_ssh")),
                                      timeout=10, source_address=("127.0.0.2", 0)) as sock:
            outcomes.append(sock.recv(64))
    assert outcomes[0].startswith(b"SSH-2.0-") and b"" in outcomes[3:]
    time.sleep(0.2)
    assert admin_server.events("admin.refused")


@pytest.mark.skipif(not shutil.which("ssh-audit"), reason="needs ssh-audit")
def test_ssh_audit_finds_no_failure(admin_server):
    result = subprocess.run(["ssh-audit", "-n", "-p", str(admin_server.port("admin_ssh")),
                             "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert "(kex) curve25519-sha256" in result.stdout
    assert "[fail]" not in result.stdout, result.stdout


# -- the interactive shell under tmux --------------------------------------------------

@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux")
def test_interactive_shell_prompt_help_completion_history(admin_server, tmp_path):
    queue_remote(admin_server, 1)
    [qid] = wait_queued(admin_server, 1)
    session = f"adm{admin_server.port('admin_ssh')}"
    command = " ".join(["ssh", "-tt", *admin_server.admin.options(), "admin@127.0.0.1"])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50",
                    command], check=True, timeout=10)

    def keys(*keys):
        subprocess.run(["tmux", "send-keys", "-t", session, *keys], check=True, timeout=10)

    def screen():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"],
                              capture_output=True, text=True, timeout=10).stdout

    def shows(text, timeout=10):
        try:
            return wait_until(lambda: text in screen(), timeout, interval=0.1,
                              what=f"{text!r} on the screen")
        except TimeoutError:
            print(screen())
            raise
    try:
        shows("mailappliance>")
        keys("help", "Enter")
        shows("queue delete")
        keys("que", "Tab", "sh", "Tab", qid[:6], "Tab", "Enter")   # completion, live ids
        shows(f"queue id:  {qid}")
        keys("user ?")
        shows("suspend")
        keys("C-u", "C-c")
        keys("Up", "Enter")                 # history: the queue show again
        wait_until(lambda: screen().count(f"queue id:  {qid}") == 2, 10, interval=0.1,
                   what="the command from history")
        keys("C-d")
        wait_until(lambda: subprocess.run(["tmux", "has-session", "-t", session],
                                          capture_output=True).returncode != 0, 10,
                   what="the session to end")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


# -- the control socket ----------------------------------------------------------------

def test_mailappliance_status_through_the_control_socket(admin_server):
    result = admin_server.cli("status")
    assert result.returncode == 0 and "mailappliance" in result.stdout
    info = json.loads(admin_server.cli("status", "--json").stdout)
    assert info["hostname"] == "mail.example.test"
    queue_remote(admin_server, 1)
    [qid] = wait_queued(admin_server, 1)
    assert admin_server.cli("queue", "hold", qid).returncode == 0
    assert json.loads(admin_server.cli("queue", "list", "--json").stdout)[0]["held"]
    sock = admin_server.data_dir / "control.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o660"
    admin_server.stop()
    gone = admin_server.cli("status")
    assert gone.returncode == 1 and "not running" in gone.stderr
    assert gone.stderr.count("\n") == 1


def test_three_refused_keys_end_the_connection(admin_server):
    keys = [make_key(admin_server.keys, f"wrong{n}") for n in range(4)]
    identities = [arg for key in keys for arg in ("-i", str(key))]
    result = subprocess.run(
        ["ssh", *admin_server.admin.options("-v", "-o", "LogLevel=DEBUG", *identities),
         "admin@127.0.0.1", "status"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 255
    assert result.stderr.count("Offering public key") == 3
    assert "too many bad auths" in result.stderr
    [failed] = wait_until(lambda: admin_server.events("admin.login_failed"), 5,
                          what="the failed login")
    assert failed["attempts"] == 3 and failed["reason"] == "unknown key"


# -- the defences through the shell ---------------------------------------------------

def _mx_greeting(server, source):
    """The MX port's first words to a client at ``source`` (b"" when closed)."""
    with socket.create_connection(("127.0.0.1", server.mx_port), timeout=10,
                                  source_address=(source, 0)) as sock:
        try:
            return sock.recv(512)
        except ConnectionResetError:
            return b""


def test_ban_list_and_unban_through_the_shell(admin_server):
    admin = admin_server.admin
    assert _mx_greeting(admin_server, "127.0.0.5").startswith(b"220 ")
    banned = admin.run("ban", "127.0.0.5", "10m")
    assert banned.returncode == 0, banned.stderr
    assert "banned: 127.0.0.5/32" in banned.stdout
    refused = _mx_greeting(admin_server, "127.0.0.5")
    assert refused == b"" or refused.startswith(b"421 ")
    [row] = json.loads(admin.run("bans", "list", "--json").stdout)
    assert row["network"] == "127.0.0.5/32" and row["duration"] == 600
    assert row["rule"] == "admin"
    limits = json.loads(admin.run("limits", "127.0.0.5", "--json").stdout)
    assert limits["ban"]["network"] == "127.0.0.5/32"
    assert admin.run("unban", "127.0.0.5").returncode == 0
    assert json.loads(admin.run("bans", "list", "--json").stdout) == []
    assert _mx_greeting(admin_server, "127.0.0.5").startswith(b"220 ")
    again = admin.run("unban", "127.0.0.5")
    assert again.returncode == 1 and "not banned" in again.stderr
    audited = wait_until(lambda: [e["command"] for e in admin_server.events("admin.command")
                                  if e["command"].startswith(("ban ", "unban "))][:2], 5,
                         what="the ban and unban commands audited")
    assert audited == ["ban 127.0.0.5 10m", "unban 127.0.0.5"]


def test_a_banned_client_cannot_reach_the_admin_port(admin_server):
    assert admin_server.admin.run("ban", "127.0.0.6", "10m").returncode == 0
    with socket.create_connection(("127.0.0.1", admin_server.port("admin_ssh")),
                                  timeout=10, source_address=("127.0.0.6", 0)) as sock:
        try:
            assert sock.recv(64) == b""         # closed before any banner
        except ConnectionResetError:
            pass
